//! What this build of xlb is: version, git revision and platform, as reported in `x-server-info`.

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const GIT_SHA: &str = env!("XLB_GIT_SHA");

/// The platform in Go's spelling (`linux/amd64`), as Interlock reports it.
pub fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    format!("{}/{arch}", std::env::consts::OS)
}

/// The `x-server-info` header value: `xlb/<version> (<git short sha>) linux/<arch>`.
pub fn server_info() -> String {
    format!("xlb/{VERSION} ({GIT_SHA}) {}", platform())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_info_has_interlock_shape() {
        let info = server_info();
        let (name, rest) = info.split_once(' ').unwrap();
        assert_eq!(name, format!("xlb/{VERSION}"));
        let (sha, platform) = rest.split_once(' ').unwrap();
        assert!(
            sha.starts_with('(') && sha.ends_with(')') && sha.len() > 2,
            "{sha}"
        );
        assert!(platform.starts_with("linux/"), "{platform}");
        assert!(!platform.contains("x86_64"), "{platform}");
    }
}
