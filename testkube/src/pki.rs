//! The throwaway PKI of one control plane, made with rcgen and written as PEM files:
//!
//! - a serving CA and kube-apiserver's serving certificate for `127.0.0.1` (IP SAN);
//! - a client CA (`--client-ca-file`) and an admin client certificate, CN `shoal-testkube-admin`,
//!   O `system:masters` (the group RBAC lets do anything, as envtest's admin user);
//! - a service-account signing key pair (`--service-account-signing-key-file`,
//!   `--service-account-key-file`).
//!
//! All keys are ECDSA P-256; the certificates are valid for rcgen's default (very long) period,
//! which is fine for a directory deleted when the control plane drops.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::error::{Error, Result};

/// Paths of the PEM files written by [`write`].
#[derive(Debug, Clone)]
pub(crate) struct PkiFiles {
    /// CA that signed the serving certificate (the kubeconfig's `certificate-authority`).
    pub serving_ca: PathBuf,
    /// kube-apiserver `--tls-cert-file`.
    pub serving_cert: PathBuf,
    /// kube-apiserver `--tls-private-key-file`.
    pub serving_key: PathBuf,
    /// kube-apiserver `--client-ca-file`.
    pub client_ca: PathBuf,
    /// The admin user's certificate (`system:masters`).
    pub admin_cert: PathBuf,
    /// The admin user's key.
    pub admin_key: PathBuf,
    /// `--service-account-signing-key-file` (PKCS#8 private key).
    pub sa_key: PathBuf,
    /// `--service-account-key-file` (the public half).
    pub sa_pub: PathBuf,
}

/// The admin user's name in its certificate.
pub const ADMIN_USER: &str = "shoal-testkube-admin";

/// The group that makes the admin user a cluster admin without any RBAC object.
pub const ADMIN_GROUP: &str = "system:masters";

fn ca(common_name: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().map_err(Error::Pki)?;
    CertifiedIssuer::self_signed(params, key).map_err(Error::Pki)
}

/// A leaf certificate signed by `issuer`: `(certificate PEM, private key PEM)`.
fn leaf(
    mut params: CertificateParams,
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> Result<(String, String)> {
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().map_err(Error::Pki)?;
    let cert = params.signed_by(&key, issuer).map_err(Error::Pki)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|source| Error::Io {
        what: "writing a PKI file",
        path: path.to_owned(),
        source,
    })
}

/// Generates the PKI and writes it into `dir`.
pub(crate) fn write(dir: &Path) -> Result<PkiFiles> {
    let files = PkiFiles {
        serving_ca: dir.join("serving-ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        client_ca: dir.join("client-ca.crt"),
        admin_cert: dir.join("admin.crt"),
        admin_key: dir.join("admin.key"),
        sa_key: dir.join("sa-signer.key"),
        sa_pub: dir.join("sa-signer.pub"),
    };

    let serving_ca = ca("shoal-testkube serving CA")?;
    let mut serving =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).map_err(Error::Pki)?;
    serving.distinguished_name.push(DnType::CommonName, "kube-apiserver");
    let (cert, key) = leaf(serving, ExtendedKeyUsagePurpose::ServerAuth, &serving_ca)?;
    write_file(&files.serving_ca, &serving_ca.pem())?;
    write_file(&files.serving_cert, &cert)?;
    write_file(&files.serving_key, &key)?;

    let client_ca = ca("shoal-testkube client CA")?;
    let mut admin = CertificateParams::default();
    admin.distinguished_name.push(DnType::CommonName, ADMIN_USER);
    admin.distinguished_name.push(DnType::OrganizationName, ADMIN_GROUP);
    let (cert, key) = leaf(admin, ExtendedKeyUsagePurpose::ClientAuth, &client_ca)?;
    write_file(&files.client_ca, &client_ca.pem())?;
    write_file(&files.admin_cert, &cert)?;
    write_file(&files.admin_key, &key)?;

    let sa = KeyPair::generate().map_err(Error::Pki)?;
    write_file(&files.sa_key, &sa.serialize_pem())?;
    write_file(&files.sa_pub, &sa.public_key_pem())?;
    Ok(files)
}
