//! The end-to-end suite: one binary, real nats-server, real services, real training.

mod cli;
mod cluster;
mod demo;
mod deploy;
mod distill;
mod faults;
mod gc;
mod health;
mod import;
mod intake;
mod monitor;
mod prune;
mod quantize;
mod security;
mod trace;
mod trainer;
mod worker;
