//! The end-to-end suite: one binary, real nats-server, real services, real training.

mod distill;
mod faults;
mod health;
mod import;
mod intake;
mod prune;
mod quantize;
mod security;
mod trace;
mod trainer;
mod worker;
