//! NATS for the node: the SDK's connection options and provisioned handles
//! (`shoal_client::Infra`), and the node-only transfers through the object store.

pub use shoal_client::connect::{connect_client, ConnectOptions, JetStreamOptions};
pub use shoal_client::Infra;
