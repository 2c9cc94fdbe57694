//! The YAML-stream applier against the real API server: CRDs go first and are waited on, every
//! object is reported with the namespace it went to, a re-apply changes nothing, and a refusal
//! stops the stream with a typed error that says what was accepted before it.

mod common;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use shoal_testkube::{apply_stream, ApplyOptions, ErrorKind, ObjectId};

/// A chart-like stream, in an order that only works if the applier reorders it: the custom
/// object and the namespaced objects come before their CRD and their Namespace.
const STREAM: &str = r#"
# Source: shoal/templates/gadget.yaml
apiVersion: testkube.shoal.dev/v1
kind: Gadget
metadata:
  name: first-gadget
  namespace: shoal-test
spec:
  size: 3
---
# Source: shoal/templates/empty.yaml (renders to nothing)
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: shoal-operator
  namespace: shoal-test
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: shoal-config
data:
  maxPayload: "8388608"
---
apiVersion: v1
kind: Namespace
metadata:
  name: shoal-test
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: gadgets.testkube.shoal.dev
spec:
  group: testkube.shoal.dev
  scope: Namespaced
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              required: [size]
              properties:
                size: {type: integer, minimum: 1}
"#;

fn id(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> ObjectId {
    ObjectId {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        namespace: namespace.map(str::to_owned),
        name: name.to_owned(),
    }
}

fn options() -> ApplyOptions {
    let mut options = ApplyOptions::new("shoal-chart");
    options.namespace = "shoal-test".to_owned();
    options
}

#[tokio::test]
async fn a_stream_is_applied_crds_first_and_reported_object_by_object() -> anyhow::Result<()> {
    let plane = common::start().await?;
    let client = plane.client();

    let applied = apply_stream(&client, STREAM, &options()).await?;
    let expected = vec![
        id("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, "gadgets.testkube.shoal.dev"),
        id("v1", "Namespace", None, "shoal-test"),
        id("testkube.shoal.dev/v1", "Gadget", Some("shoal-test"), "first-gadget"),
        id("v1", "ServiceAccount", Some("shoal-test"), "shoal-operator"),
        id("v1", "ConfigMap", Some("shoal-test"), "shoal-config"),
    ];
    assert_eq!(applied, expected);

    // Each reported object is really there, written by the configured field manager.
    Api::<Namespace>::all(client.clone()).get("shoal-test").await?;
    Api::<ServiceAccount>::namespaced(client.clone(), "shoal-test").get("shoal-operator").await?;
    let config = Api::<ConfigMap>::namespaced(client.clone(), "shoal-test").get("shoal-config").await?;
    assert_eq!(config.data.unwrap_or_default().get("maxPayload").map(String::as_str), Some("8388608"));
    let managers: Vec<_> =
        config.metadata.managed_fields.iter().flatten().filter_map(|m| m.manager.clone()).collect();
    assert_eq!(managers, ["shoal-chart"]);
    let gadgets = ApiResource::from_gvk(&GroupVersionKind::gvk("testkube.shoal.dev", "v1", "Gadget"));
    let gadget = Api::<DynamicObject>::namespaced_with(client.clone(), "shoal-test", &gadgets)
        .get("first-gadget")
        .await?;
    assert_eq!(gadget.data["spec"]["size"], 3);

    // Server-side apply is idempotent: the same stream again is accepted as it is.
    let version = gadget.metadata.resource_version.clone();
    assert_eq!(apply_stream(&client, STREAM, &options()).await?, expected);
    let again =
        Api::<DynamicObject>::namespaced_with(client, "shoal-test", &gadgets).get("first-gadget").await?;
    assert_eq!(again.metadata.resource_version, version, "a no-op re-apply wrote the object");
    Ok(())
}

#[tokio::test]
async fn refusals_stop_the_stream_with_what_was_accepted() -> anyhow::Result<()> {
    let plane = common::start().await?;
    let client = plane.client();
    apply_stream(&client, STREAM, &options()).await?;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), "shoal-test");

    // A custom object the CRD's schema refuses: 422 Invalid, after one accepted object.
    let schema = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: before}\n---\n\
                  apiVersion: testkube.shoal.dev/v1\nkind: Gadget\nmetadata: {name: tiny}\nspec: {size: 0}\n---\n\
                  apiVersion: v1\nkind: ConfigMap\nmetadata: {name: after}\n";
    let err = apply_stream(&client, schema, &options()).await.expect_err("schema violation accepted");
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    let status = err.status().expect("the server's status");
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"), "{status:?}");
    assert!(status.message.contains("spec.size"), "{status:?}");
    assert_eq!(err.accepted(), [id("v1", "ConfigMap", Some("shoal-test"), "before")]);
    assert_eq!(
        err.refused_object(),
        Some(&id("testkube.shoal.dev/v1", "Gadget", Some("shoal-test"), "tiny"))
    );
    assert!(configmaps.get_opt("after").await?.is_none(), "the stream went on after a refusal");

    // A wrong type is refused too, but server-side apply reports it while building the typed
    // patch, as a 500 without a reason (kube-apiserver 1.37), so only the field is asserted.
    let typed = "apiVersion: testkube.shoal.dev/v1\nkind: Gadget\nmetadata: {name: big}\nspec: {size: big}\n";
    let err = apply_stream(&client, typed, &options()).await.expect_err("wrong type accepted");
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.status().is_some_and(|s| s.message.contains(".spec.size")), "{err:?}");

    // An unknown field: refused (the same typed-patch 500), not silently dropped.
    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: typo}\ndatta: {a: b}\n";
    let err = apply_stream(&client, typo, &options()).await.expect_err("unknown field accepted");
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.status().is_some_and(|s| s.message.contains(".datta: field not declared")), "{err:?}");
    assert!(configmaps.get_opt("typo").await?.is_none());

    // A kind no API group serves: refused by discovery before any request is made for it.
    let unknown = "apiVersion: nope.shoal.dev/v1\nkind: Nothing\nmetadata: {name: x}\n";
    let err = apply_stream(&client, unknown, &options()).await.expect_err("unknown kind accepted");
    assert_eq!(err.kind(), ErrorKind::Refused, "{err}");
    assert!(err.accepted().is_empty());
    Ok(())
}
