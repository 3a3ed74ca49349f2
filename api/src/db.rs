//! The daemon's state in SQLite: instances, images and operations.
//! Calls are short, so one connection behind a mutex serves the whole daemon.

use crate::types::{Image, Instance, InstanceConfig, Operation};
use anyhow::{Context, Result};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Statements through the connection's cache: each SQL text is parsed once, not at
/// every call (SQLite's parser showed up in a `run --rm` profile).
trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row<T, P: rusqlite::Params>(
        &self,
        sql: &str,
        params: P,
        f: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

pub struct Db {
    conn: Mutex<Connection>,
    /// Shared with the other daemons of this host (see [`IdRanges`]); `None`: this
    /// database's own ranges only.
    id_ranges: Option<IdRanges>,
}

/// Where the daemons of a host record the id ranges they gave out.
pub const ID_RANGES_DIR: &str = "/var/lib/ltv-idranges";

/// The id ranges that every daemon of this host gave out, so that two daemons (two
/// state dirs) never give their containers the same host ids: one file per range,
/// `<dir>/<base>`, made with O_EXCL and naming the database that owns it. A file whose
/// database is gone (a deleted state dir) is stale and taken over. Ranges stay taken
/// while a stopped daemon's state dir exists, since its containers' files carry them.
struct IdRanges {
    dir: PathBuf,
    /// Our database's path, as written into our files.
    owner: String,
}

impl IdRanges {
    /// Whether `base` is ours now: free, stale, or ours already. False only when another
    /// daemon has it: a record that cannot be written is warned about and ignored, as
    /// before there were records.
    fn claim(&self, base: u32) -> bool {
        let path = self.dir.join(base.to_string());
        for _ in 0..2 {
            let made = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, self.owner.as_bytes()));
            match made {
                Ok(()) => return true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    tracing::warn!(
                        "id range {base}: cannot record it in {}: {e}",
                        self.dir.display()
                    );
                    return true;
                }
            }
            let Ok(owner) = std::fs::read_to_string(&path) else {
                continue;
            };
            if owner == self.owner {
                // Ours, from a start that failed before its database commit.
                return true;
            }
            if owner.is_empty() || Path::new(&owner).exists() {
                // Another daemon's (or one being written right now).
                return false;
            }
            // Its database is gone: take it over (once; a racing daemon may win).
            let _ = std::fs::remove_file(&path);
        }
        false
    }

    fn release(&self, base: u32) {
        let path = self.dir.join(base.to_string());
        if std::fs::read_to_string(&path).is_ok_and(|o| o == self.owner) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    image TEXT NOT NULL,
    image_fingerprint TEXT NOT NULL,
    parent TEXT,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    pid INTEGER,
    pid_start INTEGER,
    exit_code INTEGER,
    auto_remove INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    -- first host id of the instance's user-namespace range; UNIQUE: ranges never overlap
    idmap_base INTEGER UNIQUE,
    -- static IPv4 address on the bridge; UNIQUE: never handed out twice
    address TEXT UNIQUE
);
CREATE TABLE IF NOT EXISTS images (
    alias TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    source TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS operations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
";

/// An instance row plus the runtime facts the API does not show.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    pub instance: Instance,
    /// /proc start time of `pid`, to tell our process from a re-used pid.
    pub pid_start: Option<u64>,
}

/// What `insert_instance` allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocated {
    pub idmap_base: Option<u32>,
    pub address: Option<String>,
}

/// Host ids below this stay the host's own (users, systemd's dynamic ranges).
pub const IDMAP_FIRST: u32 = 1_000_000;
pub const IDMAP_SIZE: u32 = 65536;

/// The lowest range base not in `used`.
pub fn free_idmap_base(used: &[u32]) -> u32 {
    (0u32..)
        .map(|k| IDMAP_FIRST + k * IDMAP_SIZE)
        .find(|b| !used.contains(b))
        .expect("id space")
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn instance_from_row(row: &Row) -> rusqlite::Result<InstanceRow> {
    let kind: String = row.get("kind")?;
    let status: String = row.get("status")?;
    let config: String = row.get("config")?;
    let bad = |e: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    };
    Ok(InstanceRow {
        instance: Instance {
            name: row.get("name")?,
            kind: kind.parse().map_err(bad)?,
            image: row.get("image")?,
            image_fingerprint: row.get("image_fingerprint")?,
            parent: row.get("parent")?,
            config: serde_json::from_str::<InstanceConfig>(&config)
                .map_err(|e| bad(e.to_string()))?,
            status: status.parse().map_err(bad)?,
            pid: row.get("pid")?,
            exit_code: row.get("exit_code")?,
            created_at: row.get("created_at")?,
            auto_remove: row.get::<_, i64>("auto_remove")? != 0,
            idmap_base: row.get("idmap_base")?,
            address: row.get("address")?,
            usage: None,
            children: vec![],
        },
        pid_start: row.get::<_, Option<i64>>("pid_start")?.map(|v| v as u64),
    })
}

fn image_from_row(row: &Row) -> rusqlite::Result<Image> {
    let config: String = row.get("config")?;
    let cfg: ltv_containers::image::ImageConfig = serde_json::from_str(&config).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })?;
    Ok(Image {
        alias: row.get("alias")?,
        fingerprint: row.get("fingerprint")?,
        size_bytes: row.get::<_, i64>("size_bytes")? as u64,
        source: row.get("source")?,
        created_at: row.get("created_at")?,
        entrypoint: cfg.entrypoint,
        cmd: cfg.cmd,
        env: cfg.env,
        working_dir: cfg.working_dir,
        user: cfg.user,
        init: cfg.init,
    })
}

impl Db {
    pub fn open(path: &Path) -> Result<Db> {
        let conn =
            Connection::open(path).with_context(|| format!("open database {}", path.display()))?;
        // WAL + NORMAL: durable across daemon crashes, without an fsync per write.
        // NORMAL first: a new database then switches to WAL without the rollback
        // journal's fsyncs, which cost seconds in a kvm-pvm guest (its agent's first start).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.set_prepared_statement_cache_capacity(64);
        // One transaction: one commit for the whole schema.
        conn.execute_batch(&format!("BEGIN; {SCHEMA} COMMIT;"))
            .context("create schema")?;
        Ok(Db {
            conn: Mutex::new(conn),
            id_ranges: None,
        })
    }

    /// Id ranges are also recorded in `dir`, shared with the host's other daemons (see
    /// [`IdRanges`]). Our ranges that predate the record are recorded now.
    pub fn share_id_ranges(&mut self, dir: &Path, db_path: &Path) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("create {}", dir.display()))?;
        let owner = std::fs::canonicalize(db_path)
            .with_context(|| format!("resolve {}", db_path.display()))?;
        let ranges = IdRanges {
            dir: dir.to_path_buf(),
            owner: owner.to_string_lossy().into_owned(),
        };
        for base in self.idmap_bases()? {
            if !ranges.claim(base) {
                tracing::warn!(
                    "id range {base} of {} is also recorded by another daemon in {}",
                    ranges.owner,
                    dir.display()
                );
            }
        }
        self.id_ranges = Some(ranges);
        Ok(())
    }

    fn idmap_bases(&self) -> Result<Vec<u32>> {
        self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT idmap_base FROM instances WHERE idmap_base IS NOT NULL")?;
            let bases = stmt.query_map([], |r| r.get(0))?;
            bases.collect()
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&conn)?)
    }

    /// Inserts a new instance; `Ok(None)` when the name is taken. With `idmap`, a free
    /// 65536-id range is allocated in the same transaction, and with `subnet` a free
    /// address in it (an error when it is full).
    pub fn insert_instance(
        &self,
        i: &Instance,
        idmap: bool,
        subnet: Option<&ltv_containers::network::Ipv4Subnet>,
    ) -> Result<Option<Allocated>> {
        let config = serde_json::to_string(&i.config)?;
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            // A taken name is a conflict whatever is left to allocate.
            if tx.row("SELECT 1 FROM instances WHERE name = ?1", [&i.name], |_| Ok(())).optional()?.is_some() {
                return Ok(Ok(None));
            }
            let base = if idmap {
                let mut stmt = tx.prepare_cached("SELECT idmap_base FROM instances WHERE idmap_base IS NOT NULL")?;
                let mut used: Vec<u32> = stmt.query_map([], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
                // The lowest range that no other daemon of the host has either.
                loop {
                    let base = free_idmap_base(&used);
                    match &self.id_ranges {
                        Some(ranges) if !ranges.claim(base) => used.push(base),
                        _ => break Some(base),
                    }
                }
            } else {
                None
            };
            let address = match subnet {
                None => None,
                Some(subnet) => {
                    let mut stmt = tx.prepare_cached("SELECT address FROM instances WHERE address IS NOT NULL")?;
                    let used: Vec<std::net::Ipv4Addr> = stmt
                        .query_map([], |r| r.get::<_, String>(0))?
                        .filter_map(|a| a.ok()?.parse().ok())
                        .collect();
                    match ltv_containers::network::allocate(subnet, &used) {
                        Some(a) => Some(a.to_string()),
                        None => return Ok(Err(format!("no free address left in {subnet}"))),
                    }
                }
            };
            let n = tx.exec(
                "INSERT OR IGNORE INTO instances
                 (name, kind, image, image_fingerprint, parent, config, status, auto_remove, created_at, idmap_base, address)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    i.name,
                    i.kind.as_str(),
                    i.image,
                    i.image_fingerprint,
                    i.parent,
                    config,
                    i.status.as_str(),
                    i.auto_remove as i64,
                    i.created_at,
                    base,
                    address
                ],
            )?;
            tx.commit()?;
            Ok(Ok((n == 1).then_some(Allocated { idmap_base: base, address })))
        })?
        .map_err(anyhow::Error::msg)
    }

    pub fn instance(&self, name: &str) -> Result<Option<InstanceRow>> {
        self.with(|c| {
            c.row(
                "SELECT * FROM instances WHERE name = ?1",
                [name],
                instance_from_row,
            )
            .optional()
        })
    }

    pub fn instances(&self) -> Result<Vec<InstanceRow>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached("SELECT * FROM instances ORDER BY created_at, name")?;
            let rows = stmt.query_map([], instance_from_row)?;
            rows.collect()
        })
    }

    pub fn set_running(&self, name: &str, pid: i32, pid_start: u64) -> Result<()> {
        self.with(|c| {
            c.exec(
                "UPDATE instances SET status = 'Running', pid = ?2, pid_start = ?3, exit_code = NULL WHERE name = ?1",
                params![name, pid, pid_start as i64],
            )
            .map(|_| ())
        })
    }

    pub fn set_stopped(&self, name: &str, exit_code: Option<i32>) -> Result<()> {
        self.with(|c| {
            c.exec(
                "UPDATE instances SET status = 'Stopped', pid = NULL, pid_start = NULL, exit_code = ?2 WHERE name = ?1",
                params![name, exit_code],
            )
            .map(|_| ())
        })
    }

    pub fn set_config(&self, name: &str, config: &InstanceConfig) -> Result<()> {
        let config = serde_json::to_string(config)?;
        self.with(|c| {
            c.exec(
                "UPDATE instances SET config = ?2 WHERE name = ?1",
                params![name, config],
            )
            .map(|_| ())
        })
    }

    pub fn delete_instance(&self, name: &str) -> Result<()> {
        let base: Option<u32> = self.with(|c| {
            let base = c
                .row(
                    "SELECT idmap_base FROM instances WHERE name = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            c.exec("DELETE FROM instances WHERE name = ?1", [name])?;
            Ok(base)
        })?;
        if let (Some(base), Some(ranges)) = (base, &self.id_ranges) {
            ranges.release(base);
        }
        Ok(())
    }

    pub fn instances_using_image(&self, fingerprint: &str) -> Result<Vec<String>> {
        self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT name FROM instances WHERE image_fingerprint = ?1")?;
            let rows = stmt.query_map([fingerprint], |r| r.get(0))?;
            rows.collect()
        })
    }

    pub fn put_image(&self, alias: &str, info: &ltv_containers::image::ImageInfo) -> Result<Image> {
        let config = serde_json::to_string(&info.config)?;
        let created = now();
        self.with(|c| {
            c.exec(
                "INSERT INTO images (alias, fingerprint, size_bytes, source, config, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(alias) DO UPDATE SET fingerprint = excluded.fingerprint,
                   size_bytes = excluded.size_bytes, source = excluded.source,
                   config = excluded.config, created_at = excluded.created_at",
                params![
                    alias,
                    info.fingerprint,
                    info.size_bytes as i64,
                    info.source,
                    config,
                    created
                ],
            )?;
            c.row(
                "SELECT * FROM images WHERE alias = ?1",
                [alias],
                image_from_row,
            )
        })
    }

    /// Looks an image up by alias, then by fingerprint (or a unique prefix of at least 12).
    pub fn image(&self, reference: &str) -> Result<Option<Image>> {
        self.with(|c| {
            if let Some(img) = c
                .row(
                    "SELECT * FROM images WHERE alias = ?1",
                    [reference],
                    image_from_row,
                )
                .optional()?
            {
                return Ok(Some(img));
            }
            if reference.len() < 12 || !reference.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Ok(None);
            }
            // Several aliases may name one image: the prefix must pick one fingerprint.
            let mut stmt = c.prepare_cached(
                "SELECT * FROM images WHERE fingerprint LIKE ?1 || '%' ORDER BY alias",
            )?;
            let found: Vec<Image> = stmt
                .query_map([reference], image_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            let unique = found
                .windows(2)
                .all(|w| w[0].fingerprint == w[1].fingerprint);
            Ok(if unique {
                found.into_iter().next()
            } else {
                None
            })
        })
    }

    pub fn images(&self) -> Result<Vec<Image>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached("SELECT * FROM images ORDER BY alias")?;
            let rows = stmt.query_map([], image_from_row)?;
            rows.collect()
        })
    }

    /// Removes the alias; returns whether another alias still points at the fingerprint.
    pub fn delete_image(&self, alias: &str, fingerprint: &str) -> Result<bool> {
        self.with(|c| {
            c.exec("DELETE FROM images WHERE alias = ?1", [alias])?;
            let others: i64 = c.row(
                "SELECT COUNT(*) FROM images WHERE fingerprint = ?1",
                [fingerprint],
                |r| r.get(0),
            )?;
            Ok(others > 0)
        })
    }

    pub fn begin_operation(&self, action: &str, target: &str) -> Result<i64> {
        let t = now();
        self.with(|c| {
            c.exec(
                "INSERT INTO operations (action, target, status, created_at, updated_at) VALUES (?1, ?2, 'running', ?3, ?3)",
                params![action, target, t],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    pub fn finish_operation(&self, id: i64, error: Option<&str>) -> Result<()> {
        let status = if error.is_some() {
            "failure"
        } else {
            "success"
        };
        self.with(|c| {
            c.exec(
                "UPDATE operations SET status = ?2, error = ?3, updated_at = ?4 WHERE id = ?1",
                params![id, status, error, now()],
            )
            .map(|_| ())
        })
    }

    /// Operations left `running` by a daemon that died are marked failed at start-up.
    pub fn fail_interrupted_operations(&self) -> Result<()> {
        self.with(|c| {
            c.exec(
                "UPDATE operations SET status = 'failure', error = 'interrupted by a daemon restart', updated_at = ?1 WHERE status = 'running'",
                [now()],
            )
            .map(|_| ())
        })
    }

    pub fn operations(&self, limit: u32) -> Result<Vec<Operation>> {
        self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT * FROM operations ORDER BY id DESC LIMIT ?1")?;
            let rows = stmt.query_map([limit], |r| {
                Ok(Operation {
                    id: r.get("id")?,
                    action: r.get("action")?,
                    target: r.get("target")?,
                    status: r.get("status")?,
                    error: r.get("error")?,
                    created_at: r.get("created_at")?,
                    updated_at: r.get("updated_at")?,
                })
            })?;
            rows.collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Kind, Status};

    fn sample(name: &str) -> Instance {
        Instance {
            name: name.into(),
            kind: Kind::App,
            image: "busybox".into(),
            image_fingerprint: "ab".repeat(32),
            parent: None,
            config: InstanceConfig {
                memory: Some("64MiB".into()),
                ..Default::default()
            },
            status: Status::Created,
            pid: None,
            exit_code: None,
            created_at: now(),
            auto_remove: false,
            idmap_base: None,
            address: None,
            usage: None,
            children: vec![],
        }
    }

    #[test]
    fn two_daemons_never_share_an_id_range() {
        let ranges = tempfile::tempdir().unwrap();
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let open = |dir: &Path| {
            let path = dir.join("ltv.db");
            let mut db = Db::open(&path).unwrap();
            db.share_id_ranges(ranges.path(), &path).unwrap();
            db
        };
        let base = |db: &Db, name: &str| {
            db.insert_instance(&sample(name), true, None)
                .unwrap()
                .unwrap()
                .idmap_base
                .unwrap()
        };
        let a = open(a_dir.path());
        let b = open(b_dir.path());
        assert_eq!(base(&a, "x"), IDMAP_FIRST);
        assert_eq!(
            base(&b, "x"),
            IDMAP_FIRST + IDMAP_SIZE,
            "a's range is taken"
        );
        assert_eq!(base(&a, "y"), IDMAP_FIRST + 2 * IDMAP_SIZE);
        // Deleting gives the range back to every daemon.
        a.delete_instance("x").unwrap();
        assert_eq!(base(&b, "z"), IDMAP_FIRST);
        // A daemon whose state dir is gone: its ranges are taken over.
        drop(a);
        let a_path = a_dir.path().to_path_buf();
        drop(a_dir);
        assert!(!a_path.exists());
        let c_dir = tempfile::tempdir().unwrap();
        let c = open(c_dir.path());
        assert_eq!(
            base(&c, "x"),
            IDMAP_FIRST + 2 * IDMAP_SIZE,
            "y's range was a's"
        );
        // Ranges given out before the record existed are recorded when it is shared.
        let d_dir = tempfile::tempdir().unwrap();
        let d_path = d_dir.path().join("ltv.db");
        let d = Db::open(&d_path).unwrap();
        assert_eq!(base(&d, "old"), IDMAP_FIRST);
        drop(d);
        let d = open(d_dir.path());
        assert_eq!(base(&d, "new"), IDMAP_FIRST + 3 * IDMAP_SIZE);
        assert_eq!(base(&b, "w"), IDMAP_FIRST + 4 * IDMAP_SIZE);
    }

    #[test]
    fn instances_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ltv.db");
        {
            let db = Db::open(&path).unwrap();
            let subnet: ltv_containers::network::Ipv4Subnet = "10.9.0.0/30".parse().unwrap();
            let a = db
                .insert_instance(&sample("a"), true, Some(&subnet))
                .unwrap()
                .unwrap();
            assert_eq!(
                a,
                Allocated {
                    idmap_base: Some(IDMAP_FIRST),
                    address: Some("10.9.0.2".into())
                }
            );
            assert_eq!(
                db.insert_instance(&sample("a"), true, Some(&subnet))
                    .unwrap(),
                None,
                "duplicate must be refused"
            );
            assert!(
                db.insert_instance(&sample("full"), false, Some(&subnet))
                    .is_err(),
                "a /30 has one address for us"
            );
            let b = db
                .insert_instance(&sample("b"), true, None)
                .unwrap()
                .unwrap();
            assert_eq!(
                b.idmap_base,
                Some(IDMAP_FIRST + IDMAP_SIZE),
                "ranges never overlap"
            );
            let c = db
                .insert_instance(&sample("c"), false, None)
                .unwrap()
                .unwrap();
            assert_eq!(
                c,
                Allocated {
                    idmap_base: None,
                    address: None
                }
            );
            db.delete_instance("b").unwrap();
            db.delete_instance("c").unwrap();
            db.set_running("a", 42, 7).unwrap();
        }
        let db = Db::open(&path).unwrap();
        let row = db.instance("a").unwrap().unwrap();
        assert_eq!(row.instance.idmap_base, Some(IDMAP_FIRST), "persisted");
        assert_eq!(
            free_idmap_base(&[IDMAP_FIRST]),
            IDMAP_FIRST + IDMAP_SIZE,
            "b's range is free again"
        );
        assert_eq!(row.instance.status, Status::Running);
        assert_eq!(row.instance.pid, Some(42));
        assert_eq!(row.pid_start, Some(7));
        assert_eq!(row.instance.config.memory.as_deref(), Some("64MiB"));
        db.set_stopped("a", Some(3)).unwrap();
        let row = db.instance("a").unwrap().unwrap();
        assert_eq!(
            (
                row.instance.status,
                row.instance.exit_code,
                row.instance.pid
            ),
            (Status::Stopped, Some(3), None)
        );
        db.delete_instance("a").unwrap();
        assert!(db.instance("a").unwrap().is_none());
    }

    #[test]
    fn fingerprint_prefix_with_two_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("ltv.db")).unwrap();
        let info = ltv_containers::image::ImageInfo {
            fingerprint: "ab".repeat(32),
            rootfs: "/x".into(),
            config: Default::default(),
            size_bytes: 1,
            source: "test".into(),
        };
        db.put_image("one", &info).unwrap();
        db.put_image("two", &info).unwrap();
        assert_eq!(
            db.image(&"ab".repeat(32)).unwrap().unwrap().fingerprint,
            "ab".repeat(32)
        );
        assert_eq!(
            db.image("abababababab").unwrap().unwrap().fingerprint,
            "ab".repeat(32)
        );
        let other = ltv_containers::image::ImageInfo {
            fingerprint: format!("{}{}", "ab".repeat(6), "cd".repeat(26)),
            ..info
        };
        db.put_image("three", &other).unwrap();
        assert!(
            db.image("abababababab").unwrap().is_none(),
            "ambiguous prefix"
        );
    }

    #[test]
    fn operations_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("ltv.db")).unwrap();
        let id = db.begin_operation("image-build", "busybox").unwrap();
        db.finish_operation(id, Some("boom")).unwrap();
        let ops = db.operations(10).unwrap();
        assert_eq!(ops[0].status, "failure");
        assert_eq!(ops[0].error.as_deref(), Some("boom"));
    }
}
