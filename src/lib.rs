//! crownstone-webhooks: forwards Crownstone event streams to webhooks, as a Kubernetes operator.

pub mod api;
pub mod clock;
pub mod config;
pub mod controller;
pub mod conventions;
pub mod crownstone;
pub mod delivery;
pub mod domain;
pub mod forwarder;
pub mod handover;
pub mod health;
mod http1;
pub mod index;
pub mod leader;
pub mod metrics;
pub mod net;
pub mod operator;
pub mod receiver;
pub mod resources;
pub mod shard;
pub mod simulator;
pub mod telemetry;
