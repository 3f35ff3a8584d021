//! Integration tests: real HTTP servers on loopback, no mocks.

mod delivery;
mod support;
