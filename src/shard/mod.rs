//! Sharding tokens over the live replicas. Each replica holds a member Lease; every replica
//! lists the live members and hashes each token onto them by rendezvous hashing, so all agree,
//! without talking, which replica owns a token and which keeps a warm standby of it.

pub mod coordinator;
pub mod members;
pub mod ring;
