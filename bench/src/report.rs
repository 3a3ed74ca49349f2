//! results.json (raw samples + environment) and summary.md.

use crate::harness::Harness;
use crate::stats::Summary;
use crate::{meminfo, peers, BenchArgs};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Raw samples of one metric of one subject (an instance kind or a peer runtime).
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    pub subject: String,
    /// `kind` or `peer`.
    pub class: String,
    pub metric: String,
    pub unit: String,
    pub samples: Vec<f64>,
    pub failures: usize,
    pub summary: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub subject: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    pub suite: String,
    pub started_unix: u64,
    pub duration_s: f64,
    pub interrupted: bool,
    pub args: Value,
    pub environment: Value,
    pub skipped: Vec<Skip>,
    pub series: Vec<Series>,
    /// Suite-specific results (density points, overhead ratios, isolation table ...).
    pub results: Value,
    pub plots: Vec<String>,
    /// Markdown sections the suite adds after the latency table.
    #[serde(skip)]
    pub sections: Vec<String>,
}

impl Report {
    pub fn new(args: &BenchArgs, h: &Harness) -> Report {
        Report {
            schema: 1,
            suite: args.suite.clone(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            duration_s: 0.0,
            interrupted: false,
            args: json!({
                "kinds": args.kinds, "count": args.count, "peers": args.peers,
                "warmup": args.warmup, "memory_budget_pct": args.memory_budget,
                "kernel": args.kernel, "initrd": args.initrd,
                "settle_ms": args.settle_ms, "network": args.network,
            }),
            environment: environment(h),
            skipped: Vec::new(),
            series: Vec::new(),
            results: json!({}),
            plots: Vec::new(),
            sections: Vec::new(),
        }
    }

    pub fn skip(&mut self, subject: &str, reason: impl Into<String>) {
        let reason = reason.into();
        eprintln!("skipped {subject}: {reason}");
        self.skipped.push(Skip {
            subject: subject.to_string(),
            reason,
        });
    }

    pub fn add_series(
        &mut self,
        subject: &str,
        class: &str,
        metric: &str,
        unit: &str,
        samples: Vec<f64>,
        failures: usize,
    ) {
        self.series.push(Series {
            subject: subject.into(),
            class: class.into(),
            metric: metric.into(),
            unit: unit.into(),
            summary: Summary::of(&samples),
            samples,
            failures,
        });
    }

    pub fn p50(&self, subject: &str, metric: &str) -> Option<f64> {
        self.series
            .iter()
            .find(|s| s.subject == subject && s.metric == metric && !s.samples.is_empty())
            .map(|s| s.summary.p50)
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    pub fn summary_md(&self) -> String {
        let f = crate::plot::fmt_num;
        let mut md = format!("# ltv bench {}\n\n", self.suite);
        let env = &self.environment;
        md += &format!(
            "Host `{}`, kernel {}, {} CPUs ({}), {} MiB RAM, KVM: {}, cgroups: {}; ltv {}; daemon kinds: {}. Run took {:.0} s{}.\n\n",
            env["hostname"].as_str().unwrap_or("?"),
            env["kernel"].as_str().unwrap_or("?"),
            env["cpus"],
            env["cpu_model"].as_str().unwrap_or("?"),
            env["mem_total_kib"].as_u64().unwrap_or(0) / 1024,
            env["kvm"].as_str().unwrap_or("?"),
            env["cgroup"].as_str().unwrap_or("?"),
            env["ltv_version"].as_str().unwrap_or("?"),
            env["daemon_kinds"],
            self.duration_s,
            if self.interrupted { " (INTERRUPTED: partial results)" } else { "" }
        );
        md += &format!(
            "ltv instances' network: {}.{}\n\n",
            self.args["network"].as_str().unwrap_or("?"),
            if self.suite == "start" {
                format!(
                    " Pause before each measured operation: {} ms. Order: {}.",
                    self.args["settle_ms"],
                    self.results["order"].as_str().unwrap_or("?")
                )
            } else {
                String::new()
            }
        );
        if !self.series.is_empty() {
            md += "| subject | metric | n | p50 | p95 | max | failures |\n|---|---|---|---|---|---|---|\n";
            for s in &self.series {
                md += &format!(
                    "| {} ({}) | {} [{}] | {} | {} | {} | {} | {} |\n",
                    s.subject,
                    s.class,
                    s.metric,
                    s.unit,
                    s.summary.n,
                    f(s.summary.p50),
                    f(s.summary.p95),
                    f(s.summary.max),
                    s.failures
                );
            }
            md += "\n";
            let mut ratios = String::new();
            for k in self
                .series
                .iter()
                .filter(|s| s.class == "kind" && !s.samples.is_empty())
            {
                for p in self.series.iter().filter(|s| {
                    s.class == "peer"
                        && s.metric == k.metric
                        && peers::counterpart(&s.subject) == k.subject
                        && !s.samples.is_empty()
                }) {
                    ratios += &format!(
                        "| {} {} | {} | {} / {} ms | {:.2}x |\n",
                        k.subject,
                        k.metric,
                        p.subject,
                        f(k.summary.p50),
                        f(p.summary.p50),
                        k.summary.p50 / p.summary.p50
                    );
                }
            }
            if !ratios.is_empty() {
                md += "Ratios of medians (ltv kind / its counterpart: app–crun/runc, system–lxc, vm–qemu):\n\n| ltv | peer | p50 | ratio |\n|---|---|---|---|\n";
                md += &ratios;
                md += "\n";
            }
        }
        for s in &self.sections {
            md += s;
            md += "\n";
        }
        if !self.skipped.is_empty() {
            md += "Skipped:\n\n";
            for s in &self.skipped {
                md += &format!("- **{}**: {}\n", s.subject, s.reason);
            }
            md += "\n";
        }
        for p in &self.plots {
            md += &format!("![{p}]({p})\n\n");
        }
        md
    }

    pub fn write(&self, out: &Path) -> Result<Vec<PathBuf>, String> {
        let j = out.join("results.json");
        std::fs::write(
            &j,
            serde_json::to_vec_pretty(&self.to_json()).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let m = out.join("summary.md");
        std::fs::write(&m, self.summary_md()).map_err(|e| e.to_string())?;
        let mut files = vec![j, m];
        files.extend(self.plots.iter().map(|p| out.join(p)));
        Ok(files)
    }
}

fn first_line(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

pub fn environment(h: &Harness) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_default();
    let m = meminfo::read();
    let mut tools = serde_json::Map::new();
    for t in ["crun", "runc", "lxc-start", "qemu-system-x86_64", "rustc"] {
        if peers::which(t).is_some() {
            if let Some(v) = peers::version(t) {
                tools.insert(t.into(), v.into());
            }
        }
    }
    let s = &h.server;
    json!({
        "hostname": first_line("/proc/sys/kernel/hostname"),
        "kernel": first_line("/proc/sys/kernel/osrelease"),
        "kvm": s["kvm"],
        "cgroup": s["cgroup"],
        "daemon_kernel": s["kernel"],
        "daemon_kinds": s["kinds"],
        "ltv_version": s["version"],
        "api_version": s["api_version"],
        "cpu_model": cpu_model,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "mem_total_kib": meminfo::get(&m, "MemTotal"),
        "mem_available_kib": meminfo::get(&m, "MemAvailable"),
        "tools": tools,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        let mut r = Report {
            schema: 1,
            suite: "start".into(),
            started_unix: 1,
            duration_s: 2.0,
            interrupted: false,
            args: json!({}),
            environment: json!({"hostname": "h", "kernel": "6.18", "kvm": "pvm", "cgroup": "v1-hybrid"}),
            skipped: vec![],
            series: vec![],
            results: json!({}),
            plots: vec!["start.svg".into()],
            sections: vec![],
        };
        r.add_series("app", "kind", "run", "ms", vec![10.0, 20.0, 30.0], 0);
        r.add_series("crun", "peer", "run", "ms", vec![5.0, 5.0, 5.0], 1);
        r.skip("system", "not supported by this daemon yet");
        r
    }

    #[test]
    fn json_shape() {
        let v = sample().to_json();
        for k in [
            "schema",
            "suite",
            "environment",
            "series",
            "skipped",
            "results",
            "plots",
            "args",
        ] {
            assert!(v.get(k).is_some(), "missing {k}: {v}");
        }
        let s = &v["series"][0];
        assert_eq!(s["subject"], "app");
        assert_eq!(s["samples"].as_array().unwrap().len(), 3);
        assert_eq!(s["summary"]["p50"], 20.0);
        assert_eq!(s["summary"]["n"], 3);
        assert_eq!(v["series"][1]["failures"], 1);
        assert_eq!(v["skipped"][0]["subject"], "system");
        assert!(v.get("sections").is_none());
    }

    #[test]
    fn summary_has_ratio() {
        let md = sample().summary_md();
        assert!(
            md.contains("| app run | crun | 20.0 / 5.00 ms | 4.00x |"),
            "{md}"
        );
        assert!(md.contains("**system**"));
        assert!(md.contains("![start.svg](start.svg)"));
    }
}
