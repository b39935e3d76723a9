//! The programs the integration tests drive (the registry, skopeo, containerd, Garage):
//! where they are, the CI rule when one is missing, and what their processes need.

use std::fs;
use std::path::{Path, PathBuf};

/// True when the environment says we run under CI (`CI=true`, also `1`).
pub fn under_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => v.eq_ignore_ascii_case("true") || v == "1",
        Err(_) => false,
    }
}

/// Locate an executable on `PATH` (plus the usual system directories, in
/// case the test runner's `PATH` is trimmed). `name` may also be a path.
pub fn find_binary(name: &str) -> Option<PathBuf> {
    fn is_exec(p: &Path) -> bool {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_exec(&p).then_some(p);
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for extra in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(extra));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| is_exec(p))
}

/// Find `name`, applying the CI rule when it is missing: under `CI=true`
/// panic, otherwise print `SKIPPED: NAME not installed` and return `None`.
/// `package` is the Debian package that provides it (for the message).
pub fn require_binary(name: &str, package: &str) -> Option<PathBuf> {
    if let Some(p) = find_binary(name) {
        return Some(p);
    }
    if under_ci() {
        panic!(
            "`{name}` is not installed but CI=true: integration tests must not be skipped \
             under CI. Install the Debian package `{package}` (apt-get install -y {package})."
        );
    }
    eprintln!(
        "\n==================================================================\n\
         SKIPPED: {name} not installed (Debian package `{package}`); \
         this test did NOT run\n\
         ==================================================================\n"
    );
    None
}

/// A PATH value for child processes (we clear their environment).
pub(crate) fn child_path_env() -> String {
    let base = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    match std::env::var("PATH") {
        Ok(p) if !p.is_empty() => format!("{p}:{base}"),
        _ => base.to_string(),
    }
}

/// A free TCP port on 127.0.0.1 for a server to bind from its configuration: below the
/// ephemeral range, never given twice (see `support::ports`).
pub fn free_port() -> u16 {
    crate::support::ports::free_port()
}
