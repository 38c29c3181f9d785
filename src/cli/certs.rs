//! `courier certs init|issue`: a CA, server certificates and worker client certificates,
//! written through a new file and a rename (keys 0600).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::CertsCommand;
use crate::pki::{write_private, write_replacing, Authority, Validity};

/// Writes a file, refusing to overwrite unless `force`.
fn write_new(path: &Path, text: &str, private: bool, force: bool) -> anyhow::Result<()> {
    // symlink_metadata: a symlink counts as existing, even one that points nowhere.
    if std::fs::symlink_metadata(path).is_ok() && !force {
        bail!("{} exists; pass --force to overwrite it", path.display());
    }
    if private {
        write_private(path, text)
    } else {
        write_replacing(path, text.as_bytes(), 0o644)
    }
    .with_context(|| format!("Failed to write {}", path.display()))?;
    println!("wrote {}{}", path.display(), if private { " (mode 0600)" } else { "" });
    Ok(())
}

pub(super) fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// `courier certs init|issue`.
pub(super) fn certs(command: CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Init { out, name, force } => {
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let ca = Authority::new(&name).context("Failed to make the CA")?;
            write_new(&out.join("ca.crt"), &ca.cert_pem, false, force)?;
            write_new(&out.join("ca.key"), &ca.key_pem, true, force)?;
            println!(
                "keep ca.key offline; give ca.crt to workers (CA_CERT_PATH) \
                 and to the main server"
            );
            Ok(())
        }
        CertsCommand::Issue {
            ca,
            server,
            client,
            out,
            days,
            force,
        } => {
            let authority = Authority::from_pem(
                &read(&ca.join("ca.crt"), "CA certificate")?,
                &read(&ca.join("ca.key"), "CA key")?,
            )
            .context("the files in --ca are not a CA certificate and its key")?;
            let validity = Validity {
                starts_ago: 3600,
                lasts: Duration::from_secs(days.saturating_mul(86_400)),
            };
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let (name, issued) = match client {
                Some(name) => {
                    if name.is_empty() || name.contains(['/', '\\']) {
                        bail!("--client {name:?}: give a plain name such as worker-1");
                    }
                    let issued = authority
                        .issue_client(&name, validity)
                        .context("Failed to issue the client certificate")?;
                    (name, issued)
                }
                None => {
                    let names: Vec<&str> = server.iter().map(String::as_str).filter(|n| !n.is_empty()).collect();
                    if names.is_empty() {
                        bail!("--server needs at least one DNS name or IP address");
                    }
                    let issued = authority
                        .issue_server(&names, validity)
                        .with_context(|| format!("Failed to issue a server certificate for {names:?}"))?;
                    ("server".to_string(), issued)
                }
            };
            write_new(&out.join(format!("{name}.crt")), &issued.cert_pem, false, force)?;
            write_new(&out.join(format!("{name}.key")), &issued.key_pem, true, force)?;
            Ok(())
        }
    }
}
