//! Making certificates: a CA, server certificates and worker client certificates (rcgen). Used
//! by the tests and by the reference main server; keys never leave the directory they are
//! written to.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can sign server and client certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// How long an issued certificate is valid, and from when.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Seconds before now that validity starts (negative: in the future).
    pub starts_ago: i64,
    pub lasts: Duration,
}

impl Default for Validity {
    fn default() -> Validity {
        Validity {
            starts_ago: 3600,
            lasts: Duration::from_secs(825 * 86_400),
        }
    }
}

fn params(common_name: &str, names: Vec<String>, validity: Validity) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    let start = OffsetDateTime::now_utc() - time::Duration::seconds(validity.starts_ago);
    params.not_before = start;
    params.not_after = start + time::Duration::seconds(i64::try_from(validity.lasts.as_secs()).unwrap_or(i64::MAX / 2));
    Ok(params)
}

impl Authority {
    /// A new self-signed CA valid for ten years.
    pub fn new(common_name: &str) -> Result<Authority, rcgen::Error> {
        let mut params = params(
            common_name,
            Vec::new(),
            Validity {
                starts_ago: 3600,
                lasts: Duration::from_secs(3650 * 86_400),
            },
        )?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Authority {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            key_pem,
        })
    }

    /// An existing CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, KeyPair::from_pem(key_pem)?)?;
        Ok(Authority {
            issuer,
            cert_pem: cert_pem.to_string(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A server certificate for DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str], validity: Validity) -> Result<Issued, rcgen::Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let common_name = names.first().cloned().unwrap_or_else(|| "server".into());
        let mut params = params(&common_name, names, validity)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params)
    }

    /// A client certificate for a worker.
    pub fn issue_client(&self, name: &str, validity: Validity) -> Result<Issued, rcgen::Error> {
        let mut params = params(name, Vec::new(), validity)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params)
    }

    fn sign(&self, mut params: CertificateParams) -> Result<Issued, rcgen::Error> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes a private key readable by its owner only (0600 on Unix). See `write_replacing`.
pub fn write_private(path: &std::path::Path, pem: &str) -> std::io::Result<()> {
    write_replacing(path, pem.as_bytes(), 0o600)
}

/// Writes a file through a new file beside it and a rename: the result has exactly `mode`
/// (on Unix) whatever the old file had, a symlink at `path` is replaced rather than followed,
/// and a crash leaves the old file or the new one, never half of either.
pub fn write_replacing(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut temp_name = std::ffi::OsString::from(".");
    temp_name.push(name);
    temp_name.push(format!(".{}.{n}.tmp", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let mut options = std::fs::OpenOptions::new();
    // create_new: O_CREAT|O_EXCL, which never follows a symlink.
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let written = options.open(&temp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    let renamed = written.and_then(|()| std::fs::rename(&temp, path));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    renamed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn keys_are_written_0600_over_any_old_mode_and_never_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("worker.key");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&key, "new").unwrap();
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "new");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "not yours").unwrap();
        let link = dir.path().join("linked.key");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        write_private(&link, "key").unwrap();
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "not yours",
            "the target is untouched"
        );
        assert!(!std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&link).unwrap(), "key");
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 3, "worker.key, elsewhere and linked.key; no temporary files");
    }
}
