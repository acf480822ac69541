//! The integration tests: one binary (one link), each module a family.

mod support;
