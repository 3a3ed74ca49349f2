//! Export of a stored image as a tar of an OCI image layout, one uncompressed layer: how a
//! daemon hands an image to the daemon of a nested level, which imports it like any other.

use super::{io_err, Error, ImageStore};

fn at(p: &Path) -> impl FnOnce(io::Error) -> Error {
    io_err(p.display().to_string())
}
use sha2::{Digest as _, Sha256};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

/// Image config label that carries a system container's init, which OCI has no field for.
pub const INIT_LABEL: &str = "org.lightervisor.init";

/// Writes into a file while hashing what passes.
struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, name: &str, data: &[u8]) -> io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, data)
}

impl ImageStore {
    /// Writes image `fingerprint` to `out` as a tar of an OCI layout tagged `alias`.
    /// `scratch` holds the layer while its digest is computed.
    pub fn export_oci(
        &self,
        fingerprint: &str,
        alias: &str,
        out: &Path,
        scratch: &Path,
    ) -> Result<(), Error> {
        let info = self.get(fingerprint)?;
        let layer_path = scratch.join(format!("{fingerprint}.layer.tar"));
        let result = (|| {
            let file = File::create(&layer_path).map_err(at(&layer_path))?;
            let mut w = HashWriter {
                inner: io::BufWriter::new(file),
                hasher: Sha256::new(),
                count: 0,
            };
            {
                let mut tar = tar::Builder::new(&mut w);
                tar.follow_symlinks(false);
                tar.append_dir_all(".", &info.rootfs)
                    .map_err(at(&info.rootfs))?;
                tar.finish().map_err(at(&layer_path))?;
            }
            w.flush().map_err(at(&layer_path))?;
            let (layer_digest, layer_size) = (hex::encode(w.hasher.finalize()), w.count);

            let c = &info.config;
            let mut labels = serde_json::Map::new();
            if let Some(init) = &c.init {
                labels.insert(INIT_LABEL.into(), init.clone().into());
            }
            let config = serde_json::json!({
                "architecture": std::env::consts::ARCH.replace("x86_64", "amd64").replace("aarch64", "arm64"),
                "os": "linux",
                "config": {
                    "Entrypoint": c.entrypoint, "Cmd": c.cmd, "Env": c.env,
                    "WorkingDir": c.working_dir, "User": c.user, "Labels": labels,
                },
                "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
            });
            let config = serde_json::to_vec(&config).expect("json");
            let config_digest = hex::encode(Sha256::digest(&config));
            let manifest = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": format!("sha256:{config_digest}"), "size": config.len()},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
            }))
            .expect("json");
            let manifest_digest = hex::encode(Sha256::digest(&manifest));
            let index = serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                               "digest": format!("sha256:{manifest_digest}"), "size": manifest.len(),
                               "annotations": {"org.opencontainers.image.ref.name": alias}}],
            }))
            .expect("json");

            let file = File::create(out).map_err(at(out))?;
            let mut tar = tar::Builder::new(io::BufWriter::new(file));
            append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(at(out))?;
            append_bytes(&mut tar, "index.json", &index).map_err(at(out))?;
            append_bytes(
                &mut tar,
                &format!("blobs/sha256/{manifest_digest}"),
                &manifest,
            )
            .map_err(at(out))?;
            append_bytes(&mut tar, &format!("blobs/sha256/{config_digest}"), &config)
                .map_err(at(out))?;
            let mut layer = File::open(&layer_path).map_err(at(&layer_path))?;
            let mut h = tar::Header::new_ustar();
            h.set_size(layer_size);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(
                &mut h,
                format!("blobs/sha256/{layer_digest}"),
                &mut layer as &mut dyn Read,
            )
            .map_err(at(out))?;
            tar.into_inner()
                .and_then(|mut w| w.flush())
                .map_err(at(out))?;
            Ok(())
        })();
        let _ = std::fs::remove_file(&layer_path);
        if result.is_err() {
            let _ = std::fs::remove_file(out);
        }
        result
    }
}
