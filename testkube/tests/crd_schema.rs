//! A CustomResourceDefinition with a structural schema installs, becomes Established, accepts a
//! valid object and refuses malformed ones with the server's 422 `Invalid`.

mod common;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use shoal_testkube::{wait_established, ApplyOptions};

const CRD: &str = r#"{
  "apiVersion": "apiextensions.k8s.io/v1",
  "kind": "CustomResourceDefinition",
  "metadata": {"name": "widgets.testkube.shoal.dev"},
  "spec": {
    "group": "testkube.shoal.dev",
    "scope": "Namespaced",
    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
    "versions": [{
      "name": "v1", "served": true, "storage": true,
      "schema": {"openAPIV3Schema": {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
          "type": "object",
          "required": ["mode"],
          "properties": {
            "mode": {"type": "string", "enum": ["Fast", "Slow"]},
            "replicas": {"type": "integer", "minimum": 0}
          }
        }}
      }}
    }]
  }
}"#;

fn widget(name: &str, spec: serde_json::Value) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "testkube.shoal.dev/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": spec,
    }))?)
}

/// The server's refusal of `object`: (HTTP code, reason, message).
async fn refusal(api: &Api<DynamicObject>, object: &DynamicObject) -> (u16, String, String) {
    match api.create(&PostParams::default(), object).await {
        Err(kube::Error::Api(status)) => (status.code, status.reason, status.message),
        other => panic!("expected an API refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_installs_accepts_valid_and_refuses_malformed_objects() -> anyhow::Result<()> {
    let plane = common::start().await?;
    let client = plane.client();

    let crd: CustomResourceDefinition = serde_json::from_str(CRD)?;
    Api::<CustomResourceDefinition>::all(client.clone())
        .patch("widgets.testkube.shoal.dev", &PatchParams::apply("shoal-testkube"), &Patch::Apply(&crd))
        .await?;
    wait_established(&client, "widgets.testkube.shoal.dev", &ApplyOptions::new("shoal-testkube")).await?;

    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("testkube.shoal.dev", "v1", "Widget"));
    let widgets: Api<DynamicObject> = Api::namespaced_with(client, "default", &resource);

    widgets
        .create(&PostParams::default(), &widget("good", serde_json::json!({"mode": "Fast", "replicas": 2}))?)
        .await?;
    let stored = widgets.get("good").await?;
    assert_eq!(stored.data["spec"]["mode"], "Fast");
    assert_eq!(stored.data["spec"]["replicas"], 2);

    let (code, reason, message) =
        refusal(&widgets, &widget("no-mode", serde_json::json!({"replicas": 1}))?).await;
    assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
    assert!(message.contains("spec.mode") && message.contains("Required"), "{message}");

    let (code, reason, message) =
        refusal(&widgets, &widget("bad-mode", serde_json::json!({"mode": "Medium"}))?).await;
    assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
    assert!(message.contains("Unsupported value") && message.contains("Medium"), "{message}");

    let (code, reason, message) =
        refusal(&widgets, &widget("negative", serde_json::json!({"mode": "Slow", "replicas": -1}))?).await;
    assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");

    let names: Vec<String> =
        widgets.list(&Default::default()).await?.items.into_iter().filter_map(|w| w.metadata.name).collect();
    assert_eq!(names, ["good"], "a refused object was stored");
    Ok(())
}
