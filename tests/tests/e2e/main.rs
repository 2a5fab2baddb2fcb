//! The end-to-end suite: one binary, real nats-server, real services, real training.

mod faults;
mod intake;
mod trace;
mod trainer;
mod worker;
