//! Integration tests: one binary, one control plane for the whole run.

mod support;

mod crds;
