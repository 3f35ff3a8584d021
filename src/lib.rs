//! crownstone-webhooks: forwards Crownstone event streams to webhooks, as a Kubernetes operator.

pub mod delivery;
