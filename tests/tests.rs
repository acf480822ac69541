//! The integration tests: one binary (one link), each module a family. Every
//! test starts its own server on 127.0.0.1:0.

mod support;

mod access;
mod browser;
mod capacity;
mod cluster;
mod examples;
mod fifo;
mod fifo_more;
mod http;
mod lifecycle;
mod listen;
mod notify;
mod operations;
mod policy;
mod proxy;
mod pubsub;
mod queue;
mod reqres;
mod store;
mod tunnel;
mod work;
