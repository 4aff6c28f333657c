//! End-to-end tests of the shop's services: real processes on real sockets, each with its own
//! data directory, talked to over HTTP as the platform and other services would.

mod catalog;
mod common;
mod inventory;
mod lifecycle;
mod orders;
mod payments;
mod shipping;
