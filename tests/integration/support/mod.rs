//! What the integration tests share: the control plane, the simulator, receivers, the operator.

pub mod api;
pub mod cluster;
pub mod handover;
pub mod objects;
pub mod operator;
pub mod proxy;
pub mod receiver;
pub mod sim;
