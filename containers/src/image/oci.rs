//! Import of OCI image layouts (directory or tar) and `docker save` archives.

use super::layer::Applier;
use super::{detect_init, io_err, Error, ImageConfig, ImageInfo, ImageStore, Progress};
use serde_json::Value;
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// JSON documents (index, manifest, config) larger than this are refused.
const MAX_JSON: u64 = 16 << 20;
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

fn invalid(msg: impl Into<String>) -> Error {
    Error::Invalid(msg.into())
}

/// Where blobs and metadata files are read from.
enum Source {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        entries: HashMap<String, TarItem>,
    },
}

enum TarItem {
    File {
        offset: u64,
        size: u64,
    },
    /// Symlink or hardlink, already resolved to an archive path.
    Link(String),
}

/// Normalizes a path inside the archive/layout; `..` may not climb above its top.
fn norm(base_dir: &str, p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    let full = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("{base_dir}/{p}")
    };
    for c in full.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// A reader that fails if the data ends before `remaining` bytes (a truncated archive).
struct Exact<R> {
    inner: R,
    remaining: u64,
    name: String,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} is truncated", self.name),
            ));
        }
        self.remaining -= n as u64;
        Ok(n)
    }
}

impl Source {
    fn from_tar(file: &Path) -> Result<Source, Error> {
        let f = File::open(file).map_err(io_err(format!("opening {}", file.display())))?;
        let mut ar = tar::Archive::new(f);
        let mut entries = HashMap::new();
        let bad = |e: io::Error| {
            invalid(format!(
                "archive {}: bad or truncated tar: {e}",
                file.display()
            ))
        };
        for entry in ar.entries_with_seek().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            let path = entry.path().map_err(bad)?;
            let Some(name) = norm("", &path.to_string_lossy()) else {
                continue;
            };
            let dir = name
                .rsplit_once('/')
                .map(|(d, _)| d)
                .unwrap_or("")
                .to_string();
            let link = || -> Result<String, Error> {
                let t = entry
                    .link_name()
                    .map_err(bad)?
                    .ok_or_else(|| invalid(format!("link {name} without target")))?;
                Ok(t.to_string_lossy().into_owned())
            };
            let item = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => TarItem::File {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                },
                tar::EntryType::Symlink => match norm(&dir, &link()?) {
                    Some(t) => TarItem::Link(t),
                    None => continue,
                },
                tar::EntryType::Link => match norm("", &link()?) {
                    Some(t) => TarItem::Link(t),
                    None => continue,
                },
                _ => continue,
            };
            entries.insert(name, item);
        }
        Ok(Source::Tar {
            file: file.to_path_buf(),
            entries,
        })
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Source::Dir(d) => d.join(name).is_file(),
            Source::Tar { entries, .. } => entries.contains_key(name),
        }
    }

    /// Opens a file by its path in the layout; the reader errors if it is cut short.
    fn open(&self, name: &str) -> Result<(Box<dyn Read + '_>, u64), Error> {
        let Some(clean) =
            norm("", name).filter(|c| !c.is_empty() && !name.split('/').any(|c| c == ".."))
        else {
            return Err(invalid(format!("bad file name {name:?} in image metadata")));
        };
        match self {
            Source::Dir(d) => {
                let p = d.join(&clean);
                let f = match File::open(&p) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(invalid(format!("missing file {clean}")))
                    }
                    Err(e) => return Err(io_err(format!("opening {}", p.display()))(e)),
                };
                let md = f
                    .metadata()
                    .map_err(io_err(format!("stat {}", p.display())))?;
                if !md.is_file() {
                    return Err(invalid(format!("{clean} is not a regular file")));
                }
                Ok((
                    Box::new(Exact {
                        inner: f,
                        remaining: md.len(),
                        name: clean,
                    }),
                    md.len(),
                ))
            }
            Source::Tar { file, entries } => {
                let mut cur = clean.clone();
                for _ in 0..16 {
                    match entries.get(&cur) {
                        None => break,
                        Some(TarItem::Link(t)) => cur = t.clone(),
                        Some(TarItem::File { offset, size }) => {
                            let mut f = File::open(file)
                                .map_err(io_err(format!("opening {}", file.display())))?;
                            f.seek(SeekFrom::Start(*offset)).map_err(io_err("seek"))?;
                            let r = Exact {
                                inner: f.take(*size),
                                remaining: *size,
                                name: clean,
                            };
                            return Ok((Box::new(r), *size));
                        }
                    }
                }
                Err(invalid(format!("missing file {clean} in archive")))
            }
        }
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>, Error> {
        let (mut r, size) = self.open(name)?;
        if size > MAX_JSON {
            return Err(invalid(format!("{name} is too large ({size} bytes)")));
        }
        let mut v = Vec::with_capacity(size as usize);
        r.read_to_end(&mut v)
            .map_err(|e| invalid(format!("reading {name}: {e}")))?;
        Ok(v)
    }
}

/// `sha256:<hex>` → `<hex>`, refusing anything else (also keeps blob paths safe).
fn sha256_hex(digest: &str) -> Result<String, Error> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| invalid(format!("unsupported digest {digest:?} (only sha256)")))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(format!("malformed digest {digest:?}")));
    }
    Ok(hex.to_ascii_lowercase())
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

struct HashReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashReader<R> {
    fn new(inner: R) -> Self {
        HashReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
    fn finish(self) -> (String, u64) {
        (hex::encode(self.hasher.finalize()), self.count)
    }
}

impl<R: Read> Read for HashReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Reports bytes read to the progress sink, about every MiB.
struct Counting<'a, R> {
    inner: R,
    done: u64,
    last: u64,
    total: Option<u64>,
    progress: &'a dyn Progress,
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.last >= 1 << 20 || n == 0 {
            self.last = self.done;
            self.progress
                .advance(self.done, self.total.map(|t| t.max(self.done)));
        }
        Ok(n)
    }
}

struct LayerRef {
    /// Path of the blob in the layout or archive.
    name: String,
    /// Expected sha256 of the blob as stored (compressed), when known.
    digest: Option<String>,
    size: Option<u64>,
    media_type: String,
}

struct Plan {
    config: Vec<u8>,
    fingerprint: String,
    layers: Vec<LayerRef>,
    source: String,
}

fn parse_json(data: &[u8], what: &str) -> Result<Value, Error> {
    serde_json::from_slice(data).map_err(|e| invalid(format!("{what}: bad JSON: {e}")))
}

/// Reads a blob by descriptor, checking its size and digest.
fn read_blob(src: &Source, desc: &Value, what: &str) -> Result<(Vec<u8>, String), Error> {
    let digest = desc
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{what}: descriptor without digest")))?;
    let hex = sha256_hex(digest)?;
    let data = src.read_small(&format!("blobs/sha256/{hex}"))?;
    if let Some(size) = desc.get("size").and_then(Value::as_u64) {
        if size != data.len() as u64 {
            return Err(invalid(format!(
                "{what} {digest}: size {} but descriptor says {size}",
                data.len()
            )));
        }
    }
    if sha256(&data) != hex {
        return Err(invalid(format!("{what} {digest}: digest mismatch")));
    }
    Ok((data, hex))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// From an index, the manifest for this host (else one without platform, else the first).
fn pick_manifest<'a>(index: &'a Value, what: &str) -> Result<&'a Value, Error> {
    let list = index
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(format!("{what}: no manifests")))?;
    let candidates: Vec<&Value> = list
        .iter()
        .filter(|m| {
            let ann = m
                .pointer("/annotations/vnd.docker.reference.type")
                .and_then(Value::as_str);
            ann != Some("attestation-manifest")
        })
        .collect();
    let plat = |m: &Value, k: &str| {
        m.pointer(&format!("/platform/{k}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    candidates
        .iter()
        .find(|m| {
            plat(m, "os").as_deref() == Some("linux")
                && plat(m, "architecture").as_deref() == Some(host_arch())
        })
        .or_else(|| candidates.iter().find(|m| m.get("platform").is_none()))
        .or_else(|| candidates.first())
        .copied()
        .ok_or_else(|| invalid(format!("{what}: empty manifest list")))
}

fn plan_oci(src: &Source, label: &str) -> Result<Plan, Error> {
    if src.has("oci-layout") {
        let layout = parse_json(&src.read_small("oci-layout")?, "oci-layout")?;
        if layout
            .get("imageLayoutVersion")
            .and_then(Value::as_str)
            .is_none()
        {
            return Err(invalid("oci-layout: no imageLayoutVersion"));
        }
    }
    let mut doc = parse_json(&src.read_small("index.json")?, "index.json")?;
    let mut what = "index.json".to_string();
    let mut ref_name = None;
    // Indexes may nest (index.json → multi-platform index → manifest).
    for _ in 0..4 {
        if doc.get("manifests").is_none() {
            break;
        }
        let desc = pick_manifest(&doc, &what)?.clone();
        if ref_name.is_none() {
            ref_name = desc
                .pointer("/annotations/org.opencontainers.image.ref.name")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        let (data, hex) = read_blob(src, &desc, "manifest")?;
        what = format!("manifest sha256:{hex}");
        doc = parse_json(&data, &what)?;
    }
    let config_desc = doc
        .get("config")
        .ok_or_else(|| invalid(format!("{what}: no config")))?;
    let (config, fingerprint) = read_blob(src, config_desc, "config")?;
    let mut layers = Vec::new();
    for l in doc
        .get("layers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(format!("{what}: no layers")))?
    {
        let digest = l
            .get("digest")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("{what}: layer without digest")))?;
        let hex = sha256_hex(digest)?;
        layers.push(LayerRef {
            name: format!("blobs/sha256/{hex}"),
            digest: Some(hex),
            size: l.get("size").and_then(Value::as_u64),
            media_type: l
                .get("mediaType")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        });
    }
    let source = match ref_name {
        Some(r) => format!("oci:{label} ({r})"),
        None => format!("oci:{label}"),
    };
    Ok(Plan {
        config,
        fingerprint,
        layers,
        source,
    })
}

/// `blobs/sha256/<hex>` or `<hex>.json`/`<hex>/layer.tar` style names carry a digest.
fn digest_in_name(name: &str) -> Option<String> {
    if let Some(h) = name.strip_prefix("blobs/sha256/") {
        return Some(h.to_string());
    }
    let stem = name.strip_suffix(".json")?;
    (stem.len() == 64 && stem.bytes().all(|b| b.is_ascii_hexdigit())).then(|| stem.to_string())
}

fn plan_docker(src: &Source, label: &str) -> Result<Plan, Error> {
    let manifest = parse_json(&src.read_small("manifest.json")?, "manifest.json")?;
    let first = manifest
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| invalid("manifest.json: expected a non-empty array"))?;
    let config_name = first
        .get("Config")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("manifest.json: no Config"))?;
    let config = src.read_small(config_name)?;
    let fingerprint = sha256(&config);
    if let Some(h) = digest_in_name(config_name) {
        if h != fingerprint {
            return Err(invalid(format!("config {config_name}: digest mismatch")));
        }
    }
    let mut layers = Vec::new();
    for l in first
        .get("Layers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("manifest.json: no Layers"))?
    {
        let name = l
            .as_str()
            .ok_or_else(|| invalid("manifest.json: Layers must be strings"))?;
        layers.push(LayerRef {
            name: name.to_string(),
            digest: name.strip_prefix("blobs/sha256/").map(str::to_string),
            size: None,
            media_type: String::new(),
        });
    }
    let tag = first.pointer("/RepoTags/0").and_then(Value::as_str);
    let source = match tag {
        Some(t) => format!("docker-archive:{label} ({t})"),
        None => format!("docker-archive:{label}"),
    };
    Ok(Plan {
        config,
        fingerprint,
        layers,
        source,
    })
}

fn strings(cfg: &Value, key: &str) -> Result<Vec<String>, Error> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid(format!("config: {key} must be strings")))
            })
            .collect(),
        Some(_) => Err(invalid(format!("config: {key} must be an array"))),
    }
}

fn string(cfg: &Value, key: &str) -> Result<String, Error> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(invalid(format!("config: {key} must be a string"))),
    }
}

/// The run settings and layer diff ids of an image config.
fn parse_config(data: &[u8]) -> Result<(ImageConfig, Vec<String>), Error> {
    let v = parse_json(data, "config")?;
    if !v.is_object() {
        return Err(invalid("config: not an object"));
    }
    let diff_ids = v
        .pointer("/rootfs/diff_ids")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("config: no rootfs.diff_ids"))?
        .iter()
        .map(|d| {
            d.as_str()
                .ok_or_else(|| invalid("config: bad diff_id"))
                .and_then(sha256_hex)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let empty = Value::Object(Default::default());
    let c = match v.get("config") {
        None | Some(Value::Null) => &empty,
        Some(c) => c,
    };
    let config = ImageConfig {
        entrypoint: strings(c, "Entrypoint")?,
        cmd: strings(c, "Cmd")?,
        env: strings(c, "Env")?,
        working_dir: string(c, "WorkingDir")?,
        user: string(c, "User")?,
        // Our own exports carry a system container's init (see export.rs).
        init: c
            .pointer(&format!("/Labels/{}", super::INIT_LABEL.replace('/', "~1")))
            .and_then(Value::as_str)
            .map(String::from),
    };
    Ok((config, diff_ids))
}

/// Applies one layer: decompresses by magic, extracts, then checks both the blob digest
/// and the uncompressed diff id. Anything cut short surfaces as `Invalid`.
fn apply_layer(
    applier: &mut Applier,
    src: &Source,
    l: &LayerRef,
    diff_id: &str,
    what: &str,
    counting: (&mut u64, Option<u64>, &dyn Progress),
) -> Result<(), Error> {
    if l.media_type.contains("zstd") {
        return Err(invalid(format!(
            "{what}: zstd-compressed layers are not supported"
        )));
    }
    let (r, size) = src.open(&l.name)?;
    if let Some(want) = l.size {
        if want != size {
            return Err(invalid(format!(
                "{what}: blob is {size} bytes but descriptor says {want}"
            )));
        }
    }
    let (done, total, progress) = counting;
    let counted = Counting {
        inner: r,
        done: *done,
        last: *done,
        total,
        progress,
    };
    let mut blob = HashReader::new(counted);
    let got_diff = {
        let mut br = BufReader::with_capacity(256 * 1024, &mut blob);
        let head = br
            .fill_buf()
            .map_err(|e| invalid(format!("{what}: {e}")))?
            .to_vec();
        if head.starts_with(ZSTD_MAGIC) {
            return Err(invalid(format!(
                "{what}: zstd-compressed layers are not supported"
            )));
        }
        let decoded: Box<dyn Read + '_> = if head.starts_with(GZIP_MAGIC) {
            Box::new(flate2::bufread::MultiGzDecoder::new(br))
        } else {
            Box::new(br)
        };
        let mut tarred = HashReader::new(decoded);
        applier.apply(&mut tarred, what)?;
        // Drain what tar did not need (padding), so the hashes cover the whole stream.
        io::copy(&mut tarred, &mut io::sink()).map_err(|e| invalid(format!("{what}: {e}")))?;
        tarred.finish().0
    };
    io::copy(&mut blob, &mut io::sink()).map_err(|e| invalid(format!("{what}: {e}")))?;
    *done = blob.inner.done;
    let (got, _) = blob.finish();
    if let Some(want) = &l.digest {
        if &got != want {
            return Err(invalid(format!(
                "{what}: digest mismatch (got sha256:{got})"
            )));
        }
    }
    if got_diff != diff_id {
        return Err(invalid(format!(
            "{what}: uncompressed content does not match diff_id sha256:{diff_id}"
        )));
    }
    Ok(())
}

pub(super) fn import(
    store: &ImageStore,
    path: &Path,
    progress: &dyn Progress,
) -> Result<ImageInfo, Error> {
    progress.stage(&format!("Reading {}", path.display()));
    let md = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotFound(path.display().to_string()))
        }
        Err(e) => return Err(io_err(format!("stat {}", path.display()))(e)),
    };
    let tmp = store.tmp()?;
    let label = path.display().to_string();
    let src = if md.is_dir() {
        Source::Dir(path.to_path_buf())
    } else {
        let mut head = [0u8; 4];
        let mut f = File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
        let n = f
            .read(&mut head)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if head[..n].starts_with(ZSTD_MAGIC) {
            return Err(invalid(format!(
                "{label}: zstd-compressed archives are not supported"
            )));
        }
        if head[..n].starts_with(GZIP_MAGIC) {
            // Random access to blobs needs a plain tar: decompress it beside the build.
            progress.stage("Decompressing archive");
            f.seek(SeekFrom::Start(0)).map_err(io_err("seek"))?;
            let plain = tmp.path().join("input.tar");
            let mut out = File::create(&plain).map_err(io_err("creating input.tar"))?;
            let mut dec = flate2::read::MultiGzDecoder::new(BufReader::new(f));
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = match dec.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(invalid(format!("{label}: bad or truncated gzip: {e}"))),
                };
                io::Write::write_all(&mut out, &buf[..n]).map_err(io_err("writing input.tar"))?;
            }
            Source::from_tar(&plain)?
        } else {
            Source::from_tar(path)?
        }
    };
    let plan = if src.has("index.json") || src.has("oci-layout") {
        plan_oci(&src, &label)?
    } else if src.has("manifest.json") {
        plan_docker(&src, &label)?
    } else {
        return Err(invalid(format!("{label}: neither an OCI image layout nor a docker archive (no index.json or manifest.json; truncated?)")));
    };
    if store.exists(&plan.fingerprint) {
        return store.get(&plan.fingerprint);
    }
    let (mut config, diff_ids) = parse_config(&plan.config)?;
    if diff_ids.len() != plan.layers.len() {
        return Err(invalid(format!(
            "config lists {} diff_ids but there are {} layers",
            diff_ids.len(),
            plan.layers.len()
        )));
    }
    let mut applier = Applier::new(&tmp.rootfs())?;
    let total: u64 = plan.layers.iter().filter_map(|l| l.size).sum();
    let mut done = 0u64;
    for (i, (l, diff_id)) in plan.layers.iter().zip(&diff_ids).enumerate() {
        progress.stage(&format!("Applying layer {}/{}", i + 1, plan.layers.len()));
        let what = format!("layer {} ({})", i + 1, l.name);
        apply_layer(
            &mut applier,
            &src,
            l,
            diff_id,
            &what,
            (&mut done, (total > 0).then_some(total), progress),
        )?;
    }
    drop(src);
    let _ = std::fs::remove_file(tmp.path().join("input.tar"));
    config.init = detect_init(&tmp.rootfs());
    progress.stage("Storing image");
    store.commit(tmp, &plan.fingerprint, config, plan.source)
}
