//! `crdgen`: prints the `FederatedJob` CustomResourceDefinition as YAML. The committed copy is
//! `charts/shoal/files/crds/federatedjob.yaml`; CI (and `crd::tests::committed_crd_matches_crdgen`)
//! fails when it differs:
//!
//! ```text
//! cargo run -p shoal-operator --bin crdgen > charts/shoal/files/crds/federatedjob.yaml
//! ```

fn main() -> anyhow::Result<()> {
    print!("{}", shoal_operator::crd::crd_yaml()?);
    Ok(())
}
