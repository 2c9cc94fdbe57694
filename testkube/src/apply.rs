//! Server-side apply of a multi-document YAML stream (for example `helm template` output) through
//! a `kube::Client`, with dynamic objects and discovery: no type of the stream needs to be known
//! at compile time.
//!
//! Order: every CustomResourceDefinition first, then a wait until each is `Established` and its
//! kinds are served by discovery, then every Namespace, then the rest in stream order. The first
//! object the API server refuses stops the apply with [`Error::Refused`], which names it and
//! lists what was accepted before it.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, ValidationDirective};
use kube::core::GroupVersionKind;
use kube::discovery::{self, ApiCapabilities, ApiResource, Scope};

use crate::error::{Error, Result};

/// The identity of one object of a stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectId {
    /// `apiVersion`, e.g. `apps/v1`.
    pub api_version: String,
    /// `kind`, e.g. `Deployment`.
    pub kind: String,
    /// The namespace it was applied in; `None` for cluster-scoped objects (and, before apply,
    /// for namespaced objects that did not name one).
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{} {} {ns}/{}", self.api_version, self.kind, self.name),
            None => write!(f, "{} {} {}", self.api_version, self.kind, self.name),
        }
    }
}

impl ObjectId {
    /// The identity of a parsed object (as [`parse_stream`] returns it, so with type meta).
    pub fn of(object: &DynamicObject) -> Self {
        let types = object.types.clone().unwrap_or_default();
        Self {
            api_version: types.api_version,
            kind: types.kind,
            namespace: object.metadata.namespace.clone(),
            name: object.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// How [`apply_stream`] applies.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// The server-side-apply field manager (`fieldManager=`), e.g. `shoal-operator`.
    pub field_manager: String,
    /// Take over fields another manager owns (`force=true`), as a controller re-applying its
    /// desired state does.
    pub force: bool,
    /// `fieldValidation=`: what the server does with unknown or duplicate fields. `Strict` (the
    /// default) refuses the object, so a typo in a chart fails instead of being dropped. (For
    /// server-side apply, kube-apiserver 1.37 already refuses unknown fields while building the
    /// typed patch; `Strict` also covers duplicate fields and says what the caller means.)
    pub field_validation: ValidationDirective,
    /// Namespace for namespaced objects that name none (what `helm install -n` would use).
    pub namespace: String,
    /// How long a CustomResourceDefinition may take to become `Established` and discoverable.
    pub establish_timeout: Duration,
    /// Pause between two looks at a CustomResourceDefinition's status.
    pub poll_interval: Duration,
}

impl ApplyOptions {
    /// Defaults with the given field manager: force, strict field validation, namespace
    /// `default`, 30 s to establish a CRD (typically well under a second), polled every 100 ms.
    pub fn new(field_manager: impl Into<String>) -> Self {
        Self {
            field_manager: field_manager.into(),
            force: true,
            field_validation: ValidationDirective::Strict,
            namespace: "default".to_owned(),
            establish_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
        }
    }

    fn patch_params(&self) -> PatchParams {
        let mut params = PatchParams::apply(&self.field_manager);
        params.force = self.force;
        params.field_validation = Some(self.field_validation.clone());
        params
    }
}

/// Parses a multi-document YAML stream into objects. Empty documents (a lone `---`, comments
/// only, as `helm template` emits) are skipped.
///
/// # Errors
/// [`Error::Yaml`] if the text is not YAML; [`Error::InvalidObject`] for a document that is not a
/// mapping with `apiVersion`, `kind` and `metadata.name` (server-side apply needs a name, so
/// `generateName` alone is refused here).
pub fn parse_stream(yaml: &str) -> Result<Vec<DynamicObject>> {
    let documents: Vec<serde_json::Value> = serde_saphyr::from_multiple(yaml).map_err(Error::Yaml)?;
    documents
        .into_iter()
        .filter(|document| !document.is_null())
        .enumerate()
        .map(|(index, document)| to_object(index, document))
        .collect()
}

fn to_object(index: usize, document: serde_json::Value) -> Result<DynamicObject> {
    if !document.is_object() {
        return Err(Error::InvalidObject { index, reason: "not a mapping".to_owned() });
    }
    let object: DynamicObject = serde_json::from_value(document)
        .map_err(|e| Error::InvalidObject { index, reason: format!("not a Kubernetes object: {e}") })?;
    check(index, &object)?;
    Ok(object)
}

/// The object's group, version and kind, once it is known to have those and a name.
fn check(index: usize, object: &DynamicObject) -> Result<GroupVersionKind> {
    let invalid = |reason: String| Error::InvalidObject { index, reason };
    let types = object.types.as_ref().filter(|t| !t.api_version.is_empty() && !t.kind.is_empty());
    let types = types.ok_or_else(|| invalid("no apiVersion or kind".to_owned()))?;
    let gvk = GroupVersionKind::try_from(types).map_err(|e| invalid(format!("bad apiVersion: {e}")))?;
    // kube splits at the first '/' only, so "a/b/c" would reach discovery as group a, version b/c.
    let malformed = gvk.version.is_empty() || gvk.version.contains('/') || types.api_version.starts_with('/');
    if malformed {
        return Err(invalid(format!("bad apiVersion {:?}", types.api_version)));
    }
    if object.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(invalid(format!("{} has no metadata.name", types.kind)));
    }
    Ok(gvk)
}

/// Parses `yaml` with [`parse_stream`] and applies it with [`apply_objects`].
///
/// # Errors
/// Those of both.
pub async fn apply_stream(
    client: &kube::Client,
    yaml: &str,
    options: &ApplyOptions,
) -> Result<Vec<ObjectId>> {
    apply_objects(client, parse_stream(yaml)?, options).await
}

/// Applies `objects` with server-side apply: CRDs first (then waits until each is established),
/// Namespaces next, the rest in the given order. Returns every accepted object, in apply order,
/// with the namespace it went to.
///
/// # Errors
/// [`Error::Refused`] for the first object whose kind discovery does not know or whose apply the
/// API server rejects (its [`Error::status`] carries the server's code and reason, its
/// [`Error::accepted`] what went in before); [`Error::NotEstablished`] for a CRD that does not
/// become established in time; [`Error::Client`] when reading a CRD's status fails.
pub async fn apply_objects(
    client: &kube::Client,
    objects: Vec<DynamicObject>,
    options: &ApplyOptions,
) -> Result<Vec<ObjectId>> {
    let mut checked = Vec::with_capacity(objects.len());
    for (index, object) in objects.into_iter().enumerate() {
        checked.push((check(index, &object)?, object));
    }
    let (crds, rest): (Vec<_>, Vec<_>) = checked.into_iter().partition(|(gvk, _)| is_crd(gvk));
    let (namespaces, rest): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(gvk, _)| is_namespace(gvk));
    let mut applier = Applier { client, options, resources: HashMap::new(), accepted: Vec::new() };
    for (gvk, crd) in crds {
        let name = crd.metadata.name.clone().unwrap_or_default();
        applier.apply(gvk, crd).await?;
        wait_established(client, &name, options).await?;
    }
    for (gvk, object) in namespaces.into_iter().chain(rest) {
        applier.apply(gvk, object).await?;
    }
    Ok(applier.accepted)
}

fn is_crd(gvk: &GroupVersionKind) -> bool {
    gvk.group == "apiextensions.k8s.io" && gvk.version == "v1" && gvk.kind == "CustomResourceDefinition"
}

fn is_namespace(gvk: &GroupVersionKind) -> bool {
    gvk.group.is_empty() && gvk.version == "v1" && gvk.kind == "Namespace"
}

/// Applies one object at a time, remembering discovery answers per kind.
struct Applier<'a> {
    client: &'a kube::Client,
    options: &'a ApplyOptions,
    resources: HashMap<GroupVersionKind, (ApiResource, ApiCapabilities)>,
    accepted: Vec<ObjectId>,
}

impl Applier<'_> {
    async fn apply(&mut self, gvk: GroupVersionKind, mut object: DynamicObject) -> Result<()> {
        let mut id = ObjectId::of(&object);
        let (resource, capabilities) = match self.resolve(gvk).await {
            Ok(found) => found,
            Err(source) => return Err(self.refused(id, source)),
        };
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Namespaced => {
                let namespace =
                    object.metadata.namespace.get_or_insert_with(|| self.options.namespace.clone()).clone();
                id.namespace = Some(namespace.clone());
                Api::namespaced_with(self.client.clone(), &namespace, &resource)
            }
            Scope::Cluster => Api::all_with(self.client.clone(), &resource),
        };
        match api.patch(&id.name, &self.options.patch_params(), &Patch::Apply(&object)).await {
            Ok(_) => {
                tracing::debug!(object = %id, "applied");
                self.accepted.push(id);
                Ok(())
            }
            Err(source) => Err(self.refused(id, source)),
        }
    }

    async fn resolve(
        &mut self,
        gvk: GroupVersionKind,
    ) -> Result<(ApiResource, ApiCapabilities), kube::Error> {
        if let Some(found) = self.resources.get(&gvk) {
            return Ok(found.clone());
        }
        let found = discovery::pinned_kind(self.client, &gvk).await?;
        self.resources.insert(gvk, found.clone());
        Ok(found)
    }

    fn refused(&mut self, object: ObjectId, source: kube::Error) -> Error {
        Error::Refused {
            object: Box::new(object),
            accepted: std::mem::take(&mut self.accepted),
            source: Box::new(source),
        }
    }
}

/// Waits until the CRD `name` has condition `Established=True` and discovery serves each of its
/// served versions.
///
/// # Errors
/// [`Error::NotEstablished`] after [`ApplyOptions::establish_timeout`]; [`Error::Client`] if the
/// CRD cannot be read.
pub async fn wait_established(client: &kube::Client, name: &str, options: &ApplyOptions) -> Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let started = Instant::now();
    loop {
        let crd = crds.get(name).await.map_err(Error::Client)?;
        if established(&crd) && discoverable(client, &crd).await {
            return Ok(());
        }
        if started.elapsed() >= options.establish_timeout {
            return Err(Error::NotEstablished {
                name: name.to_owned(),
                waited: options.establish_timeout,
                conditions: conditions(&crd),
            });
        }
        tokio::time::sleep(options.poll_interval).await;
    }
}

fn established(crd: &CustomResourceDefinition) -> bool {
    let conditions = crd.status.as_ref().and_then(|s| s.conditions.as_ref());
    conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Established" && c.status == "True"))
}

async fn discoverable(client: &kube::Client, crd: &CustomResourceDefinition) -> bool {
    for version in crd.spec.versions.iter().filter(|v| v.served) {
        let gvk = GroupVersionKind::gvk(&crd.spec.group, &version.name, &crd.spec.names.kind);
        if discovery::pinned_kind(client, &gvk).await.is_err() {
            return false;
        }
    }
    true
}

fn conditions(crd: &CustomResourceDefinition) -> String {
    let conditions = crd.status.as_ref().and_then(|s| s.conditions.as_ref());
    let text: Vec<String> = conditions
        .into_iter()
        .flatten()
        .map(|c| format!("{}={} ({})", c.type_, c.status, c.reason.as_deref().unwrap_or("")))
        .collect();
    if text.is_empty() {
        "none".to_owned()
    } else {
        text.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_comment_only_documents_are_skipped() {
        let yaml =
            "---\n# Source: a.yaml\n---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n---\n\
                    apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: b, namespace: x}\n";
        let objects = parse_stream(yaml).unwrap();
        let ids: Vec<String> = objects.iter().map(|o| ObjectId::of(o).to_string()).collect();
        assert_eq!(ids, ["v1 ConfigMap a", "apps/v1 Deployment x/b"]);
    }

    #[test]
    fn documents_that_are_not_objects_are_refused_with_their_index() {
        let cases = [
            ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\n- a list\n", 1, "not a mapping"),
            ("kind: ConfigMap\nmetadata: {name: a}\n", 0, "no apiVersion or kind"),
            ("apiVersion: v1\nmetadata: {name: a}\n", 0, "no apiVersion or kind"),
            ("apiVersion: v1\nkind: ConfigMap\nmetadata: {generateName: a-}\n", 0, "no metadata.name"),
            ("apiVersion: a/b/c\nkind: ConfigMap\nmetadata: {name: a}\n", 0, "bad apiVersion"),
        ];
        for (yaml, want_index, want_reason) in cases {
            match parse_stream(yaml) {
                Err(Error::InvalidObject { index, reason }) => {
                    assert_eq!(index, want_index, "{yaml}");
                    assert!(reason.contains(want_reason), "{yaml}: {reason}");
                }
                other => panic!("{yaml}: expected InvalidObject, got {other:?}"),
            }
        }
    }

    #[test]
    fn text_that_is_not_yaml_is_a_yaml_error() {
        let err = parse_stream("apiVersion: v1\nkind: [unclosed\n").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Yaml);
    }

    #[test]
    fn duplicate_keys_are_refused_not_last_wins() {
        let err =
            parse_stream("apiVersion: v1\nkind: ConfigMap\nkind: Secret\nmetadata: {name: a}\n").unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Yaml, "{err}");
    }

    #[test]
    fn options_map_to_server_side_apply_parameters() {
        let mut options = ApplyOptions::new("shoal-operator");
        let params = options.patch_params();
        assert_eq!(params.field_manager.as_deref(), Some("shoal-operator"));
        assert!(params.force);
        assert!(matches!(params.field_validation, Some(ValidationDirective::Strict)));
        options.force = false;
        assert!(!options.patch_params().force);
    }
}
