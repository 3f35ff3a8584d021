//! What the integration tests share: the control plane, namespaces, waiting.

pub mod cluster;
