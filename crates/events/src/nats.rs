//! The NATS JetStream backend.
