//! The cluster certificate authority: `jfs admin ca init` and `jfs admin cert issue`.
//!
//! The CA is a key and a self-signed certificate in a directory the
//! operator keeps private (`ca.key` is the key to the whole cluster). Each
//! certificate it issues names a role (as the DNS name `<role>.jfs`, which
//! servers and clients check, see `jfs_common::tls`) and a holder (the
//! common name, which namespace grants refer to). `jfs local up` runs the
//! same code to give its cluster a CA and one certificate per role.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use jfs_common::tls::{Role, TlsDir};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{CliError, CliResult};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// Longest validity `--days` accepts (100 years).
const MAX_DAYS: u32 = 36_500;

fn err(what: impl std::fmt::Display) -> CliError {
    CliError::Failed(what.to_string())
}

fn io_err(path: &Path, e: std::io::Error) -> CliError {
    err(format!("{}: {e}", path.display()))
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// daemon re-reading the file for rotation never sees half of it.
fn write_file(path: &Path, text: &str, mode: u32) -> CliResult<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    f.write_all(text.as_bytes()).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn make_dir(dir: &Path, mode: u32) -> CliResult<()> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(|e| io_err(dir, e))
}

fn validity(params: &mut CertificateParams, days: u32) -> CliResult<()> {
    if days > MAX_DAYS {
        return Err(CliError::Usage(format!("--days {days} is more than {MAX_DAYS}")));
    }
    let now = time::OffsetDateTime::now_utc();
    // An hour of slack for hosts whose clocks run a little behind.
    params.not_before = now - time::Duration::hours(1);
    // 0 days: already expired (for checking that expired certificates are refused).
    params.not_after = if days == 0 {
        now - time::Duration::minutes(1)
    } else {
        now + time::Duration::days(days as i64)
    };
    Ok(())
}

fn random_serial(params: &mut CertificateParams) {
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f; // a positive DER integer
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
}

/// `jfs admin ca init`: a new CA key and certificate in `dir`.
pub fn init(dir: &Path, name: &str, days: u32, force: bool) -> CliResult<()> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    if key_path.exists() && !force {
        return Err(CliError::Usage(format!(
            "{} already exists: this directory holds a CA. Certificates it issued stop working if it is \
             replaced; pass --force only if that is what you want",
            key_path.display()
        )));
    }
    make_dir(dir, 0o700)?;
    let key = KeyPair::generate().map_err(|e| err(format!("cannot generate the CA key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "jfs");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, days)?;
    random_serial(&mut params);
    let cert = params
        .self_signed(&key)
        .map_err(|e| err(format!("cannot sign the CA certificate: {e}")))?;
    write_file(&key_path, &key.serialize_pem(), 0o600)?;
    write_file(&cert_path, &cert.pem(), 0o644)?;
    Ok(())
}

/// `jfs admin cert issue`: a key and a certificate for `role`/`name`,
/// signed by the CA in `ca_dir`, written to `out` as `<role>.crt` and
/// `<role>.key` (mode 600) beside a copy of the CA certificate (`ca.crt`).
/// Replacing the files of a running daemon rotates its certificate.
pub fn issue(ca_dir: &Path, out: &Path, role: Role, name: &str, days: u32, extra_names: &[String]) -> CliResult<()> {
    if name.is_empty() || name.len() > 64 || name.chars().any(|c| c.is_control()) {
        return Err(CliError::Usage(format!(
            "--name {name:?}: use 1 to 64 printable characters (a host or user name)"
        )));
    }
    let (ca_cert_path, ca_key_path) = (ca_dir.join(CA_CERT), ca_dir.join(CA_KEY));
    jfs_common::tls::check_key_permissions(&ca_key_path).map_err(err)?;
    let ca_pem = fs::read_to_string(&ca_cert_path).map_err(|e| io_err(&ca_cert_path, e))?;
    let ca_key_pem = fs::read_to_string(&ca_key_path).map_err(|e| io_err(&ca_key_path, e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| err(format!("{}: {e}", ca_key_path.display())))?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|e| err(format!("{}: {e}", ca_cert_path.display())))?;

    let key = KeyPair::generate().map_err(|e| err(format!("cannot generate a key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name = dn;
    let mut sans = vec![SanType::DnsName(
        role.dns_name().try_into().map_err(|e| err(format!("role name: {e}")))?,
    )];
    for n in extra_names {
        sans.push(match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                SanType::DnsName(n.as_str().try_into().map_err(|e| {
                    CliError::Usage(format!("--san {n:?} is neither an IP address nor a DNS name: {e}"))
                })?)
            }
        });
    }
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Daemons both serve and dial; clients and operators only dial.
    params.extended_key_usages = match role {
        Role::Metad | Role::Blockd => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
        Role::Client | Role::Admin => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days)?;
    random_serial(&mut params);
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| err(format!("cannot sign the certificate: {e}")))?;

    make_dir(out, 0o755)?;
    let dir = TlsDir::new(out);
    // Key first: a daemon re-reading the pair takes it only once both match.
    write_file(&dir.key(role), &key.serialize_pem(), 0o600)?;
    write_file(&dir.cert(role), &cert.pem(), 0o644)?;
    write_file(&dir.ca_cert(), &ca_pem, 0o644)?;
    Ok(())
}

/// The CA and certificates of a `jfs local up` cluster: a CA in STATE/ca
/// and one certificate per role in STATE/tls. Keeps what exists.
pub fn ensure_local(state: &Path) -> CliResult<PathBuf> {
    let ca_dir = state.join("ca");
    let tls_dir = state.join("tls");
    if !ca_dir.join(CA_KEY).exists() {
        init(&ca_dir, "jfs local cluster CA", 3650, false)?;
    }
    let dir = TlsDir::new(&tls_dir);
    for role in Role::ALL {
        if !(dir.cert(role).exists() && dir.key(role).exists()) {
            issue(&ca_dir, &tls_dir, role, &format!("local-{role}"), 3650, &[])?;
        }
    }
    Ok(tls_dir)
}

/// The role the CLI dials with: `admin` when this user can read the admin
/// key in the TLS directory, else `client` (enough for `jfs fs` and
/// `metastatus`; administration then fails with "access denied").
pub fn cli_role(tls_dir: &Path) -> Role {
    if fs::File::open(TlsDir::new(tls_dir).key(Role::Admin)).is_ok() {
        Role::Admin
    } else {
        Role::Client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jfs_common::tls::identity_of;
    use rustls_pki_types::pem::PemObject;

    fn read_cert(p: &Path) -> rustls_pki_types::CertificateDer<'static> {
        rustls_pki_types::CertificateDer::from_pem_file(p).unwrap()
    }

    #[test]
    fn issued_certificates_carry_role_and_name() {
        let d = tempfile::tempdir().unwrap();
        let (ca, out) = (d.path().join("ca"), d.path().join("tls"));
        init(&ca, "test CA", 10, false).unwrap();
        assert_eq!(
            fs::metadata(ca.join(CA_KEY)).unwrap().permissions().mode() & 0o777,
            0o600
        );
        for role in Role::ALL {
            issue(
                &ca,
                &out,
                role,
                &format!("n-{role}"),
                10,
                &["127.0.0.1".into(), "db1.example".into()],
            )
            .unwrap();
            let id = identity_of(&read_cert(&TlsDir::new(&out).cert(role))).unwrap();
            assert_eq!((id.role, id.name.as_str()), (role, format!("n-{role}").as_str()));
            let key_mode = fs::metadata(TlsDir::new(&out).key(role)).unwrap().permissions().mode() & 0o777;
            assert_eq!(key_mode, 0o600);
        }
        // A second init would orphan every certificate: refused without --force.
        assert!(init(&ca, "again", 10, false).is_err());
    }

    #[test]
    fn zero_days_is_already_expired() {
        let d = tempfile::tempdir().unwrap();
        let (ca, out) = (d.path().join("ca"), d.path().join("tls"));
        init(&ca, "test CA", 10, false).unwrap();
        issue(&ca, &out, Role::Client, "old", 0, &[]).unwrap();
        let left = jfs_common::tls::seconds_to_expiry(&read_cert(&TlsDir::new(&out).cert(Role::Client))).unwrap();
        assert!(left < 0, "{left}");
    }

    #[test]
    fn a_loose_ca_key_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (ca, out) = (d.path().join("ca"), d.path().join("tls"));
        init(&ca, "test CA", 10, false).unwrap();
        fs::set_permissions(ca.join(CA_KEY), fs::Permissions::from_mode(0o644)).unwrap();
        let e = issue(&ca, &out, Role::Client, "c", 10, &[]).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }
}
