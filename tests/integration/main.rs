//! Integration tests: real servers on 127.0.0.1, real HTTP.

mod simulator;
mod simulator_python;
mod support;
