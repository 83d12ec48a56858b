//! Getting a real Consul onto a machine that has Docker but no registry, and maybe not even
//! Docker: Debian 11's `consul` 1.8.7 package (MPL-2.0) is fetched with `apt-get download`
//! against a private bullseye source list (the system's apt setup is not touched), unpacked
//! into a cache directory with the glibc files it links, and turned into a `FROM scratch`
//! image tagged [`LOCAL_IMAGE`]. Every step is idempotent: a present image or binary is
//! reused in milliseconds, and concurrent callers (parallel tests) serialize on a lock file.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use testcontainers::{GenericBuildableImage, runners::AsyncBuilder};

use crate::error::{Error, Result};

/// The Consul version this project provisions by itself.
pub const CONSUL_VERSION: &str = "1.8.7";
/// The Debian package version it comes from.
pub const DEB_VERSION: &str = "1.8.7+dfsg1-2+b3";
/// Name of the locally built image: not `hashicorp/consul`, so nobody mistakes it.
pub const LOCAL_IMAGE_NAME: &str = "testbed-local/consul";
/// Tag of the locally built image.
pub const LOCAL_IMAGE_TAG: &str = "1.8.7-bullseye";
/// `name:tag` of the locally built image.
pub const LOCAL_IMAGE: &str = "testbed-local/consul:1.8.7-bullseye";

const MIRRORS: &[&str] = &[
    "http://deb.debian.org/debian",
    "http://archive.debian.org/debian",
];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// The directory that holds the fetched package and the unpacked root filesystem:
/// `$TESTBED_CACHE_DIR`, else `$XDG_CACHE_HOME/consul-testbed`, else `~/.cache/consul-testbed`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TESTBED_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("consul-testbed")
}

fn fail(step: &'static str, reason: impl ToString) -> Error {
    Error::Provision {
        version: CONSUL_VERSION,
        step,
        reason: reason.to_string(),
    }
}

/// The root filesystem of the image: `bin/consul` plus the glibc files it links.
fn rootfs_dir() -> PathBuf {
    cache_dir()
        .join(format!("consul-{CONSUL_VERSION}"))
        .join("rootfs")
}

/// The path of a ready `consul` binary, fetching and unpacking it first if needed.
/// Blocking: call it from `spawn_blocking` in async code.
pub fn ensure_consul_binary() -> Result<PathBuf> {
    let rootfs = rootfs_dir();
    let binary = rootfs.join("bin/consul");
    let done = rootfs.join(".complete");
    if done.exists() {
        return Ok(binary);
    }
    let cache = cache_dir();
    fs::create_dir_all(&cache).map_err(|e| fail("create the cache directory", e))?;
    let lock =
        fs::File::create(cache.join(".lock")).map_err(|e| fail("create the lock file", e))?;
    lock.lock().map_err(|e| fail("lock the cache", e))?;
    if done.exists() {
        return Ok(binary);
    }
    eprintln!(
        "testbed: fetching Debian bullseye's consul {DEB_VERSION} into {} (once per machine)",
        cache.display()
    );
    let deb = fetch_deb(&cache)?;
    let staging = cache.join(format!("consul-{CONSUL_VERSION}.staging"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging).map_err(|e| fail("create the staging directory", e))?;
    let unpacked = staging.join("deb");
    run(
        "unpack the package",
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
    )?;
    let new_root = staging.join("rootfs");
    copy_into(
        &unpacked.join("usr/bin/consul"),
        &new_root,
        Path::new("bin/consul"),
    )?;
    for lib in linked_libraries(&unpacked.join("usr/bin/consul"))? {
        let relative = lib.strip_prefix("/").unwrap_or(&lib).to_path_buf();
        copy_into(&lib, &new_root, &relative)?;
    }
    fs::write(new_root.join(".complete"), DEB_VERSION).map_err(|e| fail("mark complete", e))?;
    let final_dir = rootfs.parent().unwrap_or(&cache).to_path_buf();
    let _ = fs::remove_dir_all(&final_dir);
    fs::create_dir_all(&final_dir).map_err(|e| fail("create the rootfs directory", e))?;
    fs::rename(&new_root, &rootfs).map_err(|e| fail("move the rootfs into place", e))?;
    let _ = fs::remove_dir_all(&staging);
    Ok(binary)
}

/// `apt-get download consul` against a private bullseye source list; returns the `.deb`.
fn fetch_deb(cache: &Path) -> Result<PathBuf> {
    let apt = cache.join("apt");
    let archives = cache.join("archives");
    for dir in [
        apt.join("lists/partial"),
        apt.join("cache/archives/partial"),
        archives.clone(),
    ] {
        fs::create_dir_all(&dir).map_err(|e| fail("create apt directories", e))?;
    }
    if let Some(deb) = find_deb(&archives) {
        return Ok(deb);
    }
    if !Path::new(KEYRING).exists() {
        return Err(fail(
            "check the Debian keyring",
            format!(
                "{KEYRING} is missing: this needs a Debian-based machine with debian-archive-keyring installed, or Docker with CONSUL_IMAGE set to an image you have"
            ),
        ));
    }
    let mut last_error = String::new();
    for mirror in MIRRORS {
        let sources = apt.join("sources.list");
        fs::write(
            &sources,
            format!("deb [signed-by={KEYRING}] {mirror} bullseye main\n"),
        )
        .map_err(|e| fail("write the source list", e))?;
        let options = |cmd: &mut Command| {
            cmd.arg("-q")
                .arg("-o")
                .arg(format!("Dir::State::Lists={}", apt.join("lists").display()))
                .arg("-o")
                .arg(format!("Dir::Etc::SourceList={}", sources.display()))
                .arg("-o")
                .arg("Dir::Etc::SourceParts=/dev/null")
                .arg("-o")
                .arg(format!("Dir::Cache={}", apt.join("cache").display()))
                .arg("-o")
                .arg("Acquire::Languages=none")
                .arg("-o")
                .arg("APT::Sandbox::User=root");
        };
        let mut update = Command::new("apt-get");
        options(&mut update);
        update.arg("update");
        if let Err(e) = run("apt-get update (bullseye)", &mut update) {
            last_error = e.to_string();
            continue;
        }
        let mut download = Command::new("apt-get");
        options(&mut download);
        download
            .arg("download")
            .arg(format!("consul={DEB_VERSION}"))
            .current_dir(&archives);
        match run("apt-get download consul", &mut download) {
            Ok(()) => {
                return find_deb(&archives)
                    .ok_or_else(|| fail("apt-get download consul", "no .deb was written"));
            }
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(fail("fetch the package", last_error))
}

fn find_deb(dir: &Path) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("consul_") && n.ends_with(".deb"))
        })
}

/// The shared libraries `binary` loads, resolved by `ldd` (glibc only, for this package).
fn linked_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| fail("run ldd", e))?;
    if !output.status.success() {
        return Err(fail("run ldd", String::from_utf8_lossy(&output.stderr)));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let libs: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    if libs.is_empty() {
        return Err(fail("run ldd", format!("found no libraries in {text:?}")));
    }
    Ok(libs)
}

fn copy_into(source: &Path, root: &Path, relative: &Path) -> Result<()> {
    let target = root.join(relative);
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(|e| fail("create rootfs directories", e))?;
    }
    fs::copy(source, &target).map_err(|e| {
        fail(
            "copy files into the rootfs",
            format!("{}: {e}", source.display()),
        )
    })?;
    Ok(())
}

fn run(step: &'static str, cmd: &mut Command) -> Result<()> {
    let output = cmd.output().map_err(|e| fail(step, e))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(4).collect();
    Err(fail(
        step,
        format!(
            "{} ({})",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            output.status
        ),
    ))
}

/// Whether the Docker engine has `image` (`name:tag`).
pub(crate) async fn image_exists(docker: &bollard::Docker, image: &str) -> Result<bool> {
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(e) => Err(Error::ImageUnavailable {
            image: image.to_owned(),
            reason: format!("cannot inspect it: {e}"),
        }),
    }
}

static IMAGE_READY: OnceLock<tokio::sync::Mutex<bool>> = OnceLock::new();

/// Make sure the Docker engine has [`LOCAL_IMAGE`], building it if needed. Returns whether it
/// had to be built.
pub(crate) async fn ensure_local_image(docker: &bollard::Docker) -> Result<bool> {
    let mut ready = IMAGE_READY
        .get_or_init(|| tokio::sync::Mutex::new(false))
        .lock()
        .await;
    if *ready || image_exists(docker, LOCAL_IMAGE).await? {
        *ready = true;
        return Ok(false);
    }
    let rootfs = tokio::task::spawn_blocking(|| ensure_consul_binary().map(|_| rootfs_dir()))
        .await
        .map_err(|e| fail("join the provisioning task", e))??;
    // Another process may have built it while we fetched.
    if image_exists(docker, LOCAL_IMAGE).await? {
        *ready = true;
        return Ok(false);
    }
    eprintln!("testbed: building Docker image {LOCAL_IMAGE} (FROM scratch, once per machine)");
    let mut image = GenericBuildableImage::new(LOCAL_IMAGE_NAME, LOCAL_IMAGE_TAG)
        .with_dockerfile_string(dockerfile());
    for entry in fs::read_dir(&rootfs).map_err(|e| fail("read the rootfs", e))? {
        let entry = entry.map_err(|e| fail("read the rootfs", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        image = image.with_file(entry.path(), format!("./rootfs/{name}"));
    }
    let _built = image
        .build_image()
        .await
        .map_err(|e| Error::ImageUnavailable {
            image: LOCAL_IMAGE.to_owned(),
            reason: format!("docker build failed: {e}"),
        })?;
    *ready = true;
    Ok(true)
}

fn dockerfile() -> String {
    format!(
        "FROM scratch\n\
         LABEL org.opencontainers.image.title=\"consul {CONSUL_VERSION} (Debian bullseye package {DEB_VERSION}), built locally by testbed\"\n\
         LABEL org.opencontainers.image.licenses=\"MPL-2.0\"\n\
         COPY rootfs/ /\n\
         ENTRYPOINT [\"/bin/consul\"]\n\
         CMD [\"agent\", \"-dev\", \"-client\", \"0.0.0.0\"]\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_is_from_scratch_with_consul_entrypoint() {
        let d = dockerfile();
        assert!(d.starts_with("FROM scratch\n"));
        assert!(d.contains("ENTRYPOINT [\"/bin/consul\"]"));
        assert!(d.contains("\"agent\", \"-dev\", \"-client\", \"0.0.0.0\""));
    }
}
