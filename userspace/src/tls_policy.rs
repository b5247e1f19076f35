//! `SSLProtocols` and `SSLCiphers`: nginx's and OpenSSL's spellings mapped to the protocol
//! versions and cipher suites rustls (with its `ring` provider) implements.
//!
//! rustls implements TLS 1.2 and 1.3 only, and only AEAD suites with forward secrecy. A name
//! OpenSSL knows but rustls lacks (`TLSv1.1`, `DHE-RSA-AES128-GCM-SHA256`, `RC4`) is accepted
//! and reported as unavailable, the way OpenSSL skips what its build lacks; a name OpenSSL does
//! not know is an error. As in nginx, `SSLCiphers` governs the TLS 1.2 suites: the TLS 1.3
//! suites stay enabled unless the list names some of them.

use std::sync::Arc;

use rustls::{
    crypto::{ring, CryptoProvider},
    CipherSuite, SupportedProtocolVersion,
};

/// A protocol version rustls implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// `SSLProtocols`, e.g. `TLSv1.2 TLSv1.3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protocols {
    pub versions: Vec<TlsVersion>,
    /// Names nginx knows that rustls does not implement (`TLSv1`, `SSLv3`).
    pub unavailable: Vec<String>,
}

/// `SSLCiphers`, e.g. `HIGH:!aNULL:!MD5` or `ECDHE-RSA-AES128-GCM-SHA256:...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ciphers {
    /// The selected suites, in preference order.
    pub suites: Vec<CipherSuite>,
    /// Cipher names OpenSSL knows that rustls does not implement.
    pub unavailable: Vec<String>,
}

/// Parses an nginx `ssl_protocols` list (space- or comma-separated).
pub fn parse_protocols(text: &str) -> Result<Protocols, String> {
    let mut versions = Vec::new();
    let mut unavailable = Vec::new();
    let mut unknown = Vec::new();
    for name in text.split([' ', ',', '\t']).filter(|name| !name.is_empty()) {
        match name.to_ascii_lowercase().as_str() {
            "tlsv1.2" => versions.push(TlsVersion::Tls12),
            "tlsv1.3" => versions.push(TlsVersion::Tls13),
            "sslv2" | "sslv3" | "tlsv1" | "tlsv1.1" => unavailable.push(name.to_owned()),
            _ => unknown.push(name.to_owned()),
        }
    }
    if !unknown.is_empty() {
        return Err(format!(
            "unknown protocol {}: {} (known: SSLv2 SSLv3 TLSv1 TLSv1.1 TLSv1.2 TLSv1.3)",
            plural(unknown.len(), "name", "names"),
            unknown.join(", ")
        ));
    }
    versions.dedup();
    if versions.is_empty() {
        return Err("names no protocol rustls implements (TLSv1.2, TLSv1.3)".to_owned());
    }
    versions.sort_by_key(|version| *version == TlsVersion::Tls12);
    Ok(Protocols {
        versions,
        unavailable,
    })
}

/// Evaluates an OpenSSL cipher list over the suites rustls implements: names, aliases such as
/// `HIGH` or `aRSA`, `A+B` intersections, and the `!`, `-` and `+` operators and `@STRENGTH`,
/// with OpenSSL's meaning (add, remove, remove for good, move to the end).
pub fn parse_ciphers(text: &str) -> Result<Ciphers, String> {
    let mut selected: Vec<usize> = Vec::new();
    let mut banned = [false; SUITES.len()];
    let mut tls13_named = false;
    let mut unavailable = Vec::new();
    let mut unknown = Vec::new();
    for item in text
        .split([':', ',', ' ', '\t'])
        .filter(|item| !item.is_empty())
    {
        if let Some(command) = item.strip_prefix('@') {
            match command {
                "STRENGTH" => selected.sort_by_key(|&index| std::cmp::Reverse(SUITES[index].bits)),
                level if level.starts_with("SECLEVEL=") => {}
                _ => unknown.push(item.to_owned()),
            }
            continue;
        }
        let (operator, expression) = match item.as_bytes()[0] {
            b'!' | b'-' | b'+' => (item.as_bytes()[0], &item[1..]),
            _ => (b' ', item),
        };
        let mut matches = [true; SUITES.len()];
        for term in expression.split('+') {
            match term_matches(term) {
                Term::Matches(term_matches) => {
                    tls13_named |= SUITES
                        .iter()
                        .zip(term_matches)
                        .any(|(suite, hit)| hit && suite.tls13);
                    for (matched, hit) in matches.iter_mut().zip(term_matches) {
                        *matched &= hit;
                    }
                }
                Term::Unavailable => {
                    if operator == b' ' {
                        unavailable.push(term.to_owned());
                    }
                    matches = [false; SUITES.len()];
                }
                Term::Unknown => unknown.push(term.to_owned()),
            }
        }
        let hits = (0..SUITES.len()).filter(|&index| matches[index]);
        match operator {
            b'!' => {
                for index in hits {
                    banned[index] = true;
                }
                selected.retain(|&index| !banned[index]);
            }
            b'-' => selected.retain(|&index| !matches[index]),
            b'+' => {
                let (moved, kept): (Vec<usize>, Vec<usize>) =
                    selected.iter().partition(|&&index| matches[index]);
                selected = kept.into_iter().chain(moved).collect();
            }
            _ => {
                for index in hits {
                    if !banned[index] && !selected.contains(&index) {
                        selected.push(index);
                    }
                }
            }
        }
    }
    if !unknown.is_empty() {
        unknown.dedup();
        return Err(format!(
            "unknown cipher {}: {}",
            plural(unknown.len(), "name", "names"),
            unknown.join(", ")
        ));
    }
    if !tls13_named {
        let tls13 = (0..SUITES.len()).filter(|&index| SUITES[index].tls13);
        selected = tls13.chain(selected).collect();
    }
    if !selected.iter().any(|&index| !SUITES[index].tls13) && !tls13_named {
        return Err(format!(
            "selects no TLS 1.2 cipher suite rustls implements (it has: {})",
            SUITES
                .iter()
                .filter(|suite| !suite.tls13)
                .map(|suite| suite.openssl)
                .collect::<Vec<_>>()
                .join(":")
        ));
    }
    if selected.is_empty() {
        return Err("selects no cipher suite rustls implements".to_owned());
    }
    unavailable.dedup();
    Ok(Ciphers {
        suites: selected.into_iter().map(|index| SUITES[index].id).collect(),
        unavailable,
    })
}

/// The protocol versions and cipher suites a TLS endpoint offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicy {
    pub versions: Vec<TlsVersion>,
    /// In preference order.
    pub suites: Vec<CipherSuite>,
}

impl Default for TlsPolicy {
    /// Everything rustls implements, in its own preference order.
    fn default() -> Self {
        Self {
            versions: vec![TlsVersion::Tls13, TlsVersion::Tls12],
            suites: ring::default_provider()
                .cipher_suites
                .iter()
                .map(|suite| suite.suite())
                .collect(),
        }
    }
}

impl TlsPolicy {
    /// The policy of `SSLProtocols` and `SSLCiphers`, each defaulting to all rustls implements.
    pub fn new(protocols: Option<&Protocols>, ciphers: Option<&Ciphers>) -> Self {
        let default = Self::default();
        Self {
            versions: protocols.map_or(default.versions, |p| p.versions.clone()),
            suites: ciphers.map_or(default.suites, |c| c.suites.clone()),
        }
    }

    /// rustls' `ring` provider restricted to the policy's suites, in its order.
    pub fn crypto_provider(&self) -> Arc<CryptoProvider> {
        let mut provider = ring::default_provider();
        let available = std::mem::take(&mut provider.cipher_suites);
        provider.cipher_suites = self
            .suites
            .iter()
            .filter_map(|wanted| available.iter().find(|suite| suite.suite() == *wanted))
            .copied()
            .collect();
        Arc::new(provider)
    }

    pub fn protocol_versions(&self) -> Vec<&'static SupportedProtocolVersion> {
        self.versions
            .iter()
            .map(|version| match version {
                TlsVersion::Tls12 => &rustls::version::TLS12,
                TlsVersion::Tls13 => &rustls::version::TLS13,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    Rsa,
    Ecdsa,
    /// TLS 1.3 suites leave authentication to the certificate.
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Aes128Gcm,
    Aes256Gcm,
    Chacha20Poly1305,
}

struct Suite {
    id: CipherSuite,
    openssl: &'static str,
    iana: &'static str,
    tls13: bool,
    auth: Auth,
    bulk: Bulk,
    bits: u16,
}

/// Every suite of rustls' `ring` provider, in its preference order.
const SUITES: [Suite; 9] = [
    tls13(
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        "TLS_AES_256_GCM_SHA384",
        Bulk::Aes256Gcm,
    ),
    tls13(
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        "TLS_AES_128_GCM_SHA256",
        Bulk::Aes128Gcm,
    ),
    tls13(
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        "TLS_CHACHA20_POLY1305_SHA256",
        Bulk::Chacha20Poly1305,
    ),
    tls12(
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        Auth::Ecdsa,
        Bulk::Aes256Gcm,
    ),
    tls12(
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        Auth::Ecdsa,
        Bulk::Aes128Gcm,
    ),
    tls12(
        CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        Auth::Ecdsa,
        Bulk::Chacha20Poly1305,
    ),
    tls12(
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        Auth::Rsa,
        Bulk::Aes256Gcm,
    ),
    tls12(
        CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        Auth::Rsa,
        Bulk::Aes128Gcm,
    ),
    tls12(
        CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        "ECDHE-RSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        Auth::Rsa,
        Bulk::Chacha20Poly1305,
    ),
];

const fn tls13(id: CipherSuite, name: &'static str, bulk: Bulk) -> Suite {
    Suite {
        id,
        openssl: name,
        iana: name,
        tls13: true,
        auth: Auth::Any,
        bulk,
        bits: bits(bulk),
    }
}

const fn tls12(
    id: CipherSuite,
    openssl: &'static str,
    iana: &'static str,
    auth: Auth,
    bulk: Bulk,
) -> Suite {
    Suite {
        id,
        openssl,
        iana,
        tls13: false,
        auth,
        bulk,
        bits: bits(bulk),
    }
}

const fn bits(bulk: Bulk) -> u16 {
    match bulk {
        Bulk::Aes128Gcm => 128,
        Bulk::Aes256Gcm | Bulk::Chacha20Poly1305 => 256,
    }
}

enum Term {
    /// Which of [`SUITES`] the term selects.
    Matches([bool; SUITES.len()]),
    /// A cipher OpenSSL knows and rustls does not implement.
    Unavailable,
    Unknown,
}

/// One term of a cipher list: a suite's OpenSSL or IANA name, or an OpenSSL alias. As in
/// OpenSSL, aliases select TLS 1.2 suites only, and names are case-sensitive.
fn term_matches(term: &str) -> Term {
    if let Some(index) = SUITES
        .iter()
        .position(|suite| suite.openssl == term || suite.iana == term)
    {
        let mut matches = [false; SUITES.len()];
        matches[index] = true;
        return Term::Matches(matches);
    }
    if UNAVAILABLE_CIPHERS
        .split_whitespace()
        .any(|name| name == term)
    {
        return Term::Unavailable;
    }
    let alias: fn(&Suite) -> bool = match term {
        "ALL" | "DEFAULT" | "HIGH" | "TLSv1.2" | "ECDH" | "ECDHE" | "EECDH" | "kECDHE"
        | "kEECDH" | "FIPS" => |_| true,
        "aRSA" => |suite| suite.auth == Auth::Rsa,
        "aECDSA" | "ECDSA" => |suite| suite.auth == Auth::Ecdsa,
        "AES" | "AESGCM" => |suite| suite.bulk != Bulk::Chacha20Poly1305,
        "AES128" => |suite| suite.bulk == Bulk::Aes128Gcm,
        "AES256" => |suite| suite.bulk == Bulk::Aes256Gcm,
        "CHACHA20" => |suite| suite.bulk == Bulk::Chacha20Poly1305,
        // Aliases of what rustls never implements: key exchanges without forward secrecy or
        // authentication, CBC and legacy ciphers, legacy MACs and protocol versions.
        "MEDIUM"
        | "LOW"
        | "EXPORT"
        | "EXP"
        | "COMPLEMENTOFDEFAULT"
        | "COMPLEMENTOFALL"
        | "eNULL"
        | "NULL"
        | "aNULL"
        | "ADH"
        | "AECDH"
        | "kRSA"
        | "RSA"
        | "DH"
        | "DHE"
        | "EDH"
        | "kDHE"
        | "kEDH"
        | "kDHr"
        | "kDHd"
        | "kECDHr"
        | "kECDHe"
        | "aDH"
        | "aECDH"
        | "DSS"
        | "aDSS"
        | "PSK"
        | "kPSK"
        | "kECDHEPSK"
        | "kDHEPSK"
        | "kRSAPSK"
        | "aPSK"
        | "SRP"
        | "kSRP"
        | "aSRP"
        | "GOST"
        | "aGOST"
        | "kGOST"
        | "MD5"
        | "SHA1"
        | "SHA"
        | "SHA256"
        | "SHA384"
        | "RC4"
        | "RC2"
        | "DES"
        | "3DES"
        | "IDEA"
        | "SEED"
        | "CAMELLIA"
        | "CAMELLIA128"
        | "CAMELLIA256"
        | "ARIA"
        | "ARIA128"
        | "ARIA256"
        | "AESCCM"
        | "AESCCM8"
        | "CBC"
        | "SSLv3"
        | "TLSv1"
        | "TLSv1.0"
        | "SUITEB128"
        | "SUITEB128ONLY"
        | "SUITEB192" => |_| false,
        _ => return Term::Unknown,
    };
    let mut matches = [false; SUITES.len()];
    for (matched, suite) in matches.iter_mut().zip(&SUITES) {
        *matched = !suite.tls13 && alias(suite);
    }
    Term::Matches(matches)
}

/// OpenSSL's names of the cipher suites rustls does not implement.
const UNAVAILABLE_CIPHERS: &str = "
ADH-AES128-GCM-SHA256 ADH-AES128-SHA ADH-AES128-SHA256 ADH-AES256-GCM-SHA384 ADH-AES256-SHA
ADH-AES256-SHA256 ADH-CAMELLIA128-SHA ADH-CAMELLIA128-SHA256 ADH-CAMELLIA256-SHA
ADH-CAMELLIA256-SHA256 AECDH-AES128-SHA AECDH-AES256-SHA AECDH-NULL-SHA AES128-CCM AES128-CCM8
AES128-GCM-SHA256 AES128-SHA AES128-SHA256 AES256-CCM AES256-CCM8 AES256-GCM-SHA384 AES256-SHA
AES256-SHA256 ARIA128-GCM-SHA256 ARIA256-GCM-SHA384 CAMELLIA128-SHA CAMELLIA128-SHA256
CAMELLIA256-SHA CAMELLIA256-SHA256 DES-CBC3-SHA DHE-DSS-AES128-GCM-SHA256 DHE-DSS-AES128-SHA
DHE-DSS-AES128-SHA256 DHE-DSS-AES256-GCM-SHA384 DHE-DSS-AES256-SHA DHE-DSS-AES256-SHA256
DHE-DSS-ARIA128-GCM-SHA256 DHE-DSS-ARIA256-GCM-SHA384 DHE-DSS-CAMELLIA128-SHA
DHE-DSS-CAMELLIA128-SHA256 DHE-DSS-CAMELLIA256-SHA DHE-DSS-CAMELLIA256-SHA256
DHE-PSK-AES128-CBC-SHA DHE-PSK-AES128-CBC-SHA256 DHE-PSK-AES128-CCM DHE-PSK-AES128-CCM8
DHE-PSK-AES128-GCM-SHA256 DHE-PSK-AES256-CBC-SHA DHE-PSK-AES256-CBC-SHA384 DHE-PSK-AES256-CCM
DHE-PSK-AES256-CCM8 DHE-PSK-AES256-GCM-SHA384 DHE-PSK-ARIA128-GCM-SHA256
DHE-PSK-ARIA256-GCM-SHA384 DHE-PSK-CAMELLIA128-SHA256 DHE-PSK-CAMELLIA256-SHA384
DHE-PSK-CHACHA20-POLY1305 DHE-PSK-NULL-SHA DHE-PSK-NULL-SHA256 DHE-PSK-NULL-SHA384
DHE-RSA-AES128-CCM DHE-RSA-AES128-CCM8 DHE-RSA-AES128-GCM-SHA256 DHE-RSA-AES128-SHA
DHE-RSA-AES128-SHA256 DHE-RSA-AES256-CCM DHE-RSA-AES256-CCM8 DHE-RSA-AES256-GCM-SHA384
DHE-RSA-AES256-SHA DHE-RSA-AES256-SHA256 DHE-RSA-ARIA128-GCM-SHA256 DHE-RSA-ARIA256-GCM-SHA384
DHE-RSA-CAMELLIA128-SHA DHE-RSA-CAMELLIA128-SHA256 DHE-RSA-CAMELLIA256-SHA
DHE-RSA-CAMELLIA256-SHA256 DHE-RSA-CHACHA20-POLY1305 DHE-RSA-DES-CBC3-SHA
ECDHE-ARIA128-GCM-SHA256 ECDHE-ARIA256-GCM-SHA384 ECDHE-ECDSA-AES128-CCM
ECDHE-ECDSA-AES128-CCM8 ECDHE-ECDSA-AES128-SHA ECDHE-ECDSA-AES128-SHA256 ECDHE-ECDSA-AES256-CCM
ECDHE-ECDSA-AES256-CCM8 ECDHE-ECDSA-AES256-SHA ECDHE-ECDSA-AES256-SHA384
ECDHE-ECDSA-ARIA128-GCM-SHA256 ECDHE-ECDSA-ARIA256-GCM-SHA384 ECDHE-ECDSA-CAMELLIA128-SHA256
ECDHE-ECDSA-CAMELLIA256-SHA384 ECDHE-ECDSA-DES-CBC3-SHA ECDHE-ECDSA-NULL-SHA
ECDHE-ECDSA-RC4-SHA ECDHE-PSK-AES128-CBC-SHA ECDHE-PSK-AES128-CBC-SHA256
ECDHE-PSK-AES256-CBC-SHA ECDHE-PSK-AES256-CBC-SHA384 ECDHE-PSK-CAMELLIA128-SHA256
ECDHE-PSK-CAMELLIA256-SHA384 ECDHE-PSK-CHACHA20-POLY1305 ECDHE-PSK-NULL-SHA
ECDHE-PSK-NULL-SHA256 ECDHE-PSK-NULL-SHA384 ECDHE-RSA-AES128-SHA ECDHE-RSA-AES128-SHA256
ECDHE-RSA-AES256-SHA ECDHE-RSA-AES256-SHA384 ECDHE-RSA-CAMELLIA128-SHA256
ECDHE-RSA-CAMELLIA256-SHA384 ECDHE-RSA-DES-CBC3-SHA ECDHE-RSA-NULL-SHA ECDHE-RSA-RC4-SHA
EDH-DSS-DES-CBC3-SHA EDH-RSA-DES-CBC3-SHA NULL-MD5 NULL-SHA NULL-SHA256 PSK-AES128-CBC-SHA
PSK-AES128-CBC-SHA256 PSK-AES128-CCM PSK-AES128-CCM8 PSK-AES128-GCM-SHA256 PSK-AES256-CBC-SHA
PSK-AES256-CBC-SHA384 PSK-AES256-CCM PSK-AES256-CCM8 PSK-AES256-GCM-SHA384
PSK-ARIA128-GCM-SHA256 PSK-ARIA256-GCM-SHA384 PSK-CAMELLIA128-SHA256 PSK-CAMELLIA256-SHA384
PSK-CHACHA20-POLY1305 PSK-NULL-SHA PSK-NULL-SHA256 PSK-NULL-SHA384 RC4-MD5 RC4-SHA
RSA-PSK-AES128-CBC-SHA RSA-PSK-AES128-CBC-SHA256 RSA-PSK-AES128-GCM-SHA256
RSA-PSK-AES256-CBC-SHA RSA-PSK-AES256-CBC-SHA384 RSA-PSK-AES256-GCM-SHA384
RSA-PSK-ARIA128-GCM-SHA256 RSA-PSK-ARIA256-GCM-SHA384 RSA-PSK-CAMELLIA128-SHA256
RSA-PSK-CAMELLIA256-SHA384 RSA-PSK-CHACHA20-POLY1305 RSA-PSK-NULL-SHA RSA-PSK-NULL-SHA256
RSA-PSK-NULL-SHA384 SRP-AES-128-CBC-SHA SRP-AES-256-CBC-SHA SRP-DSS-AES-128-CBC-SHA
SRP-DSS-AES-256-CBC-SHA SRP-RSA-AES-128-CBC-SHA SRP-RSA-AES-256-CBC-SHA
TLS_AES_128_CCM_8_SHA256 TLS_AES_128_CCM_SHA256
";

fn plural<'a>(count: usize, one: &'a str, many: &'a str) -> &'a str {
    if count == 1 {
        one
    } else {
        many
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn suites(text: &str) -> Vec<CipherSuite> {
        parse_ciphers(text).unwrap().suites
    }

    fn tls12_names(text: &str) -> Vec<&'static str> {
        suites(text)
            .into_iter()
            .filter_map(|id| SUITES.iter().find(|suite| suite.id == id))
            .filter(|suite| !suite.tls13)
            .map(|suite| suite.openssl)
            .collect()
    }

    #[test]
    fn protocols_in_nginx_spelling() {
        let both = parse_protocols("TLSv1.2 TLSv1.3").unwrap();
        assert_eq!(both.versions, [TlsVersion::Tls13, TlsVersion::Tls12]);
        assert!(both.unavailable.is_empty());
        let legacy = parse_protocols("TLSv1 TLSv1.1 TLSv1.2").unwrap();
        assert_eq!(legacy.versions, [TlsVersion::Tls12]);
        assert_eq!(legacy.unavailable, ["TLSv1", "TLSv1.1"]);
    }

    #[test]
    fn unknown_or_only_unavailable_protocols_are_errors() {
        assert_eq!(
            parse_protocols("TLSv1.2 TLSv1.4 SSLv4").unwrap_err(),
            "unknown protocol names: TLSv1.4, SSLv4 (known: SSLv2 SSLv3 TLSv1 TLSv1.1 TLSv1.2 TLSv1.3)"
        );
        assert_eq!(
            parse_protocols("TLSv1 TLSv1.1").unwrap_err(),
            "names no protocol rustls implements (TLSv1.2, TLSv1.3)"
        );
        assert!(parse_protocols("").is_err());
    }

    #[test]
    fn interlock_default_selects_every_suite() {
        let selected = parse_ciphers("HIGH:!aNULL:!MD5").unwrap();
        assert_eq!(selected.suites, TlsPolicy::default().suites);
        assert!(selected.unavailable.is_empty());
    }

    #[test]
    fn explicit_names_keep_their_order_and_tls13_stays_first() {
        let list = "ECDHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES128-GCM-SHA256:\
                    TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256";
        let selected = parse_ciphers(list).unwrap();
        assert_eq!(
            selected.suites,
            [
                CipherSuite::TLS13_AES_256_GCM_SHA384,
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ]
        );
        assert_eq!(selected.unavailable, ["DHE-RSA-AES128-GCM-SHA256"]);
    }

    #[test]
    fn naming_a_tls13_suite_restricts_tls13() {
        assert_eq!(
            suites("TLS_AES_128_GCM_SHA256:ECDHE-RSA-AES256-GCM-SHA384"),
            [
                CipherSuite::TLS13_AES_128_GCM_SHA256,
                CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
            ]
        );
    }

    #[test]
    fn operators_and_intersections_behave_like_openssl() {
        assert_eq!(
            tls12_names("aRSA+AESGCM"),
            ["ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-AES128-GCM-SHA256"]
        );
        assert_eq!(
            tls12_names("ECDHE:-aECDSA:CHACHA20"),
            [
                "ECDHE-RSA-AES256-GCM-SHA384",
                "ECDHE-RSA-AES128-GCM-SHA256",
                "ECDHE-RSA-CHACHA20-POLY1305",
                "ECDHE-ECDSA-CHACHA20-POLY1305",
            ]
        );
        assert_eq!(
            tls12_names("ALL:!ECDSA:ECDHE-ECDSA-AES128-GCM-SHA256"),
            [
                "ECDHE-RSA-AES256-GCM-SHA384",
                "ECDHE-RSA-AES128-GCM-SHA256",
                "ECDHE-RSA-CHACHA20-POLY1305",
            ]
        );
        assert_eq!(
            tls12_names("AES128:CHACHA20:+aECDSA"),
            [
                "ECDHE-RSA-AES128-GCM-SHA256",
                "ECDHE-RSA-CHACHA20-POLY1305",
                "ECDHE-ECDSA-AES128-GCM-SHA256",
                "ECDHE-ECDSA-CHACHA20-POLY1305",
            ]
        );
        assert_eq!(
            tls12_names("AES128:AES256:@STRENGTH:@SECLEVEL=2")[..2],
            [
                "ECDHE-ECDSA-AES256-GCM-SHA384",
                "ECDHE-RSA-AES256-GCM-SHA384"
            ]
        );
    }

    #[test]
    fn unknown_names_are_errors_naming_them() {
        assert_eq!(
            parse_ciphers("ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES999-GCM:!BOGUS").unwrap_err(),
            "unknown cipher names: ECDHE-RSA-AES999-GCM, BOGUS"
        );
        assert_eq!(
            parse_ciphers("HIGH:@FASTEST").unwrap_err(),
            "unknown cipher name: @FASTEST"
        );
    }

    #[test]
    fn a_list_of_unavailable_ciphers_only_is_an_error() {
        let error = parse_ciphers("DHE-RSA-AES128-GCM-SHA256:RC4-SHA").unwrap_err();
        assert!(
            error.starts_with("selects no TLS 1.2 cipher suite rustls implements"),
            "{error}"
        );
    }

    #[test]
    fn policy_restricts_the_provider() {
        let ciphers = parse_ciphers("ECDHE-RSA-AES128-GCM-SHA256").unwrap();
        let protocols = parse_protocols("TLSv1.2").unwrap();
        let policy = TlsPolicy::new(Some(&protocols), Some(&ciphers));
        let provider = policy.crypto_provider();
        let offered: Vec<CipherSuite> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(
            offered[3..],
            [CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]
        );
        assert_eq!(policy.protocol_versions(), [&rustls::version::TLS12]);
    }
}
