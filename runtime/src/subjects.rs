//! Every NATS subject, stream, bucket, key and object name: `shoal_proto::subjects`.

pub use shoal_proto::subjects::*;
