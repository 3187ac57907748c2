//! Integration tests: the real service on real sockets, with real child processes.

mod answers;
mod auth;
mod basics;
mod callbacks;
mod cancel;
mod cli;
#[cfg(feature = "postgres")]
mod cluster;
mod connections;
mod contain;
mod dashboard;
mod errors;
mod faults;
mod faulty;
mod helpers;
mod library;
mod limits;
mod observe;
mod openapi;
mod operations;
mod persistence;
mod process;
mod reload;
mod requests;
mod secrets;
mod streaming;
