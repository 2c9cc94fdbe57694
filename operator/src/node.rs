//! [`NodeName`]: the Kubernetes node a gateway, function host or aggregator runs on.

use std::borrow::Cow;
use std::fmt;

use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A Kubernetes node name (an RFC 1123 subdomain: 1–253 characters from `[a-z0-9.-]`, starting
/// and ending with a letter or digit), validated on every path in. Ordered by its text, which
/// is the tie-break order of every planner in this crate, so plans are deterministic.
///
/// Placement writes one function-host Deployment per (job, node) with the required node
/// affinity `kubernetes.io/hostname In [<node>]` (reference/kubernetes.md R3.6).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeName(String);

impl NodeName {
    /// Validates and wraps `name`.
    ///
    /// # Errors
    /// [`Error::InvalidNodeName`] when `name` is not an RFC 1123 subdomain.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let bytes = name.as_bytes();
        let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        let ok = !bytes.is_empty()
            && bytes.len() <= 253
            && bytes.iter().all(|b| alnum(b) || *b == b'-' || *b == b'.')
            && bytes.first().is_some_and(alnum)
            && bytes.last().is_some_and(alnum);
        if ok {
            Ok(NodeName(name))
        } else {
            Err(Error::InvalidNodeName(name.chars().take(80).collect()))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for NodeName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self, Error> {
        NodeName::new(s)
    }
}

impl From<NodeName> for String {
    fn from(n: NodeName) -> String {
        n.0
    }
}

impl std::str::FromStr for NodeName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        NodeName::new(s)
    }
}

impl JsonSchema for NodeName {
    fn schema_name() -> Cow<'static, str> {
        "NodeName".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_generator: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 253,
            "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_node_names_only() {
        for ok in ["node-0", "a", "ip-10-0-0-1.ec2.internal", "kind-worker2"] {
            assert_eq!(NodeName::new(ok).unwrap().as_str(), ok);
        }
        for bad in ["", "-node", "node-", "Node", "node_0", "node 0", &"a".repeat(254)] {
            assert_eq!(NodeName::new(bad).unwrap_err().kind(), crate::ErrorKind::InvalidNodeName, "{bad}");
        }
    }
}
