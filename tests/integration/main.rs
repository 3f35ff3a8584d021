//! Integration tests, one binary: a real control plane (started once per run), the simulator,
//! real HTTP receivers, all on 127.0.0.1.

mod support;

mod api;
mod burst;
mod chart;
mod crds;
mod dead_letter;
mod delivery;
mod delivery_policy;
mod facade_hardening;
mod handover;
mod handover_gap;
mod handover_peer;
mod leader;
mod members;
mod namespaces;
mod observability;
mod operator;
mod rbac;
mod rotation;
mod sharding;
mod simulator;
mod simulator_python;
mod standby;
mod stream_hardening;
mod traces;
mod trust;
