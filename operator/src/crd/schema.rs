//! A structural OpenAPI schema for `spec.jobSpec` ([`shoal_proto::JobSpec`]).
//!
//! Kubernetes accepts only *structural* schemas: every property typed outside the logical
//! junctors, no `oneOf` branch declaring properties of its own. schemars describes Shoal's
//! internally tagged enums (`strategy` by `name`, `round_policy` by `mode`, `server_optimizer`,
//! FedBuff's `staleness` by `kind`) as `oneOf` of objects, which kube's rewriter cannot hoist
//! because each branch gives the tag a different value (and `beta` is a number in
//! `trimmed-mean` but an integer in `bristle`). [`job_spec`] rewrites them here instead:
//!
//! - a `oneOf`/`anyOf` of string enums becomes one `enum`;
//! - a tagged union becomes one object: the tag is required and enumerates the variants, every
//!   variant's properties are merged (an integer/number clash becomes `number`; the first
//!   description wins), and each variant's required fields become a CEL rule
//!   `self.<tag> != '<variant>' || (has(self.a) && ...)` with a message naming them;
//! - `Option<T>`'s `anyOf [T, null]` becomes `T` with `nullable: true`; `default: null`,
//!   `additionalProperties: false` (the apiserver prunes unknown fields instead) and `const`
//!   (as a one-value `enum`) are normalised;
//! - ids get their pattern (`[A-Za-z0-9_-]{1,64}`), which their serde-only validation does not
//!   show schemars.
//!
//! What remains unchecked by the schema (cross-field maths: Krum's `f` against the cohort,
//! `min_clients <= cohort_size`, ...) is `shoal_functions::factory::validate`'s, run in
//! reconcile, whose failure sets `Ready=False reason=InvalidSpec` naming the field.

use schemars::generate::SchemaSettings;
use schemars::{Schema, SchemaGenerator};
use serde_json::{json, Map, Value};

/// The id pattern of `shoal_proto::ids` (1–64 characters from `[A-Za-z0-9_-]`).
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-]{1,64}$";

/// The `schema_with` function of `FederatedJobSpec::job_spec`.
pub fn job_spec(_generator: &mut SchemaGenerator) -> Schema {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let mut value = generator.into_root_schema_for::<shoal_proto::JobSpec>().to_value();
    if let Some(obj) = value.as_object_mut() {
        obj.remove("title");
        obj.remove("$schema");
        obj.remove("definitions");
        obj.remove("components");
    }
    structural(&mut value);
    if let Some(job) = value.pointer_mut("/properties/job").and_then(Value::as_object_mut) {
        job.insert("pattern".into(), json!(ID_PATTERN));
    }
    if let Some(client) = value
        .pointer_mut("/properties/strategy/properties/clients/items/properties/client")
        .and_then(Value::as_object_mut)
    {
        client.insert("pattern".into(), json!(ID_PATTERN));
    }
    Schema::try_from(value).unwrap_or_else(|_| Schema::from(true))
}

/// Rewrites `value` (a schema) and everything under it into structural form.
pub fn structural(value: &mut Value) {
    let Some(obj) = value.as_object_mut() else { return };
    for key in ["items", "additionalProperties", "not"] {
        if let Some(child) = obj.get_mut(key) {
            structural(child);
        }
    }
    if let Some(Value::Object(props)) = obj.get_mut("properties") {
        props.values_mut().for_each(structural);
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(Value::Array(branches)) = obj.get_mut(key) {
            branches.iter_mut().for_each(structural);
        }
    }
    unwrap_nullable(obj);
    for key in ["oneOf", "anyOf"] {
        if let Some(Value::Array(branches)) = obj.remove(key) {
            if let Some(merged) = merge_string_enums(&branches).or_else(|| merge_tagged(&branches)) {
                absorb(obj, merged);
            } else {
                obj.insert(key.into(), Value::Array(branches));
            }
        }
    }
    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
        obj.remove("additionalProperties");
    }
    if obj.get("default") == Some(&Value::Null) {
        obj.remove("default");
    }
    if let Some(c) = obj.remove("const") {
        obj.insert("enum".into(), json!([c]));
    }
}

/// `anyOf: [T, {enum: [null], nullable: true}]` (or `{type: null}`) → `T` + `nullable: true`.
fn unwrap_nullable(obj: &mut Map<String, Value>) {
    let Some(Value::Array(branches)) = obj.get("anyOf") else { return };
    let is_null = |b: &Value| b.get("enum") == Some(&json!([null])) || b.get("type") == Some(&json!("null"));
    if branches.len() != 2 || !is_null(&branches[1]) {
        return;
    }
    let Some(Value::Object(inner)) = branches.first().cloned() else { return };
    obj.remove("anyOf");
    for (k, v) in inner {
        obj.entry(k).or_insert(v);
    }
    obj.insert("nullable".into(), Value::Bool(true));
    obj.remove("default");
}

/// Every branch a `{type: string, enum: [...]}`: one string enum.
fn merge_string_enums(branches: &[Value]) -> Option<Value> {
    let mut values = Vec::new();
    for b in branches {
        if b.get("type") != Some(&json!("string")) || b.get("properties").is_some() {
            return None;
        }
        values.extend(b.get("enum")?.as_array()?.iter().cloned());
    }
    Some(json!({"type": "string", "enum": values}))
}

/// Every branch an object with one common single-valued enum property (the tag): one object.
fn merge_tagged(branches: &[Value]) -> Option<Value> {
    let props = |b: &Value| b.get("properties").and_then(Value::as_object).cloned();
    let first = props(branches.first()?)?;
    let tag = first.keys().find(|k| {
        branches.iter().all(|b| {
            props(b)
                .and_then(|p| p.get(*k).and_then(|t| t.get("enum")).and_then(Value::as_array).cloned())
                .is_some_and(|e| e.len() == 1 && e[0].is_string())
        })
    })?;
    let mut merged: Map<String, Value> = Map::new();
    let mut tags = Vec::new();
    let mut rules = Vec::new();
    for b in branches {
        let p = props(b)?;
        let variant = p.get(tag)?.get("enum")?.get(0)?.as_str()?.to_owned();
        tags.push(Value::String(variant.clone()));
        for (name, schema) in p {
            if name == *tag {
                continue;
            }
            match merged.get_mut(&name) {
                None => {
                    merged.insert(name, schema);
                }
                Some(existing) => widen(existing, &schema),
            }
        }
        let required: Vec<&str> = b
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).filter(|r| *r != tag).collect())
            .unwrap_or_default();
        if !required.is_empty() {
            let has: Vec<String> = required.iter().map(|r| format!("has(self.{r})")).collect();
            rules.push(json!({
                "rule": format!("self.{tag} != '{variant}' || ({})", has.join(" && ")),
                "message": format!("{tag} {variant} needs {}", required.join(", ")),
            }));
        }
    }
    merged.insert(tag.clone(), json!({"type": "string", "enum": tags}));
    let mut out = json!({"type": "object", "properties": merged, "required": [tag]});
    if !rules.is_empty() {
        out["x-kubernetes-validations"] = Value::Array(rules);
    }
    Some(out)
}

/// Makes `existing` accept what `other` accepts where they clash: integer and number give
/// number; enums are united; bounds are dropped when they differ.
fn widen(existing: &mut Value, other: &Value) {
    let (Some(e), Some(o)) = (existing.as_object_mut(), other.as_object()) else { return };
    if e.get("type") != o.get("type") {
        let numeric = |t: Option<&Value>| matches!(t.and_then(Value::as_str), Some("integer" | "number"));
        if numeric(e.get("type")) && numeric(o.get("type")) {
            e.insert("type".into(), json!("number"));
            e.remove("format");
        }
    } else if e.get("format") != o.get("format") {
        e.remove("format");
    }
    if let (Some(Value::Array(a)), Some(Value::Array(b))) = (e.get_mut("enum"), o.get("enum")) {
        for v in b {
            if !a.contains(v) {
                a.push(v.clone());
            }
        }
    }
    for bound in ["minimum", "maximum", "default"] {
        if e.get(bound) != o.get(bound) {
            e.remove(bound);
        }
    }
}

/// Moves the merged schema's keys into `obj` (the parent keeps its description and default).
fn absorb(obj: &mut Map<String, Value>, merged: Value) {
    let Value::Object(m) = merged else { return };
    for (k, v) in m {
        match obj.get_mut(&k) {
            Some(Value::Array(existing)) if k == "x-kubernetes-validations" => {
                if let Value::Array(more) = v {
                    existing.extend(more);
                }
            }
            Some(_) => {}
            None => {
                obj.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a schema and returns the paths of every `oneOf`/`anyOf`/`allOf`, `const` and
    /// `additionalProperties: false` left, and of every object property without a type.
    fn non_structural(v: &Value, path: &str, out: &mut Vec<String>) {
        let Some(o) = v.as_object() else { return };
        for k in ["oneOf", "anyOf", "allOf", "const"] {
            if o.contains_key(k) {
                out.push(format!("{path}: {k}"));
            }
        }
        if o.get("additionalProperties") == Some(&Value::Bool(false)) {
            out.push(format!("{path}: additionalProperties false"));
        }
        if !o.contains_key("type") && !o.contains_key("x-kubernetes-preserve-unknown-fields") {
            out.push(format!("{path}: no type"));
        }
        if let Some(Value::Object(props)) = o.get("properties") {
            for (k, p) in props {
                non_structural(p, &format!("{path}.{k}"), out);
            }
        }
        if let Some(items) = o.get("items") {
            non_structural(items, &format!("{path}[]"), out);
        }
    }

    fn schema() -> Value {
        job_spec(&mut SchemaGenerator::default()).to_value()
    }

    #[test]
    fn the_job_spec_schema_is_structural() {
        let mut problems = Vec::new();
        non_structural(&schema(), "jobSpec", &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
    }

    #[test]
    fn tagged_unions_become_a_discriminator_and_cel_rules() {
        let s = schema();
        let strategy = &s["properties"]["strategy"];
        let names: Vec<&str> = strategy["properties"]["name"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            names,
            [
                "fedavg",
                "fedbuff",
                "fedfix",
                "median",
                "trimmed-mean",
                "krum",
                "multi-krum",
                "bulyan",
                "rffl",
                "bristle"
            ]
        );
        // trimmed-mean's beta is a number, bristle's an integer: the merged field takes both.
        assert_eq!(strategy["properties"]["beta"]["type"], "number");
        let rules: Vec<&str> = strategy["x-kubernetes-validations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| r["rule"].as_str())
            .collect();
        assert!(rules.contains(&"self.name != 'krum' || (has(self.byzantine))"), "{rules:?}");
        assert!(
            rules.contains(&"self.name != 'multi-krum' || (has(self.byzantine) && has(self.keep))"),
            "{rules:?}"
        );
        let modes = &s["properties"]["round_policy"]["properties"]["mode"]["enum"];
        assert_eq!(modes, &json!(["sync", "buffered", "periodic"]));
        assert_eq!(s["properties"]["round_policy"]["required"], json!(["mode"]));
        assert_eq!(s["properties"]["job"]["pattern"], ID_PATTERN);
        assert_eq!(s["properties"]["server_optimizer"]["nullable"], true);
        let dtypes = &s["properties"]["manifest"]["properties"]["tensors"]["items"]["properties"]["dtype"];
        assert_eq!(dtypes["type"], "string");
        assert_eq!(dtypes["enum"].as_array().unwrap().len(), 12);
    }
}
