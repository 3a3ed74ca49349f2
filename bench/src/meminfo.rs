//! /proc/meminfo: the host-wide numbers the density and page-cache suites diff.

use std::collections::HashMap;

/// Parses `Key:   123 kB` lines into KiB values.
pub fn parse(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let v = rest.split_whitespace().next()?.parse().ok()?;
            Some((k.trim().to_string(), v))
        })
        .collect()
}

pub fn read() -> HashMap<String, u64> {
    parse(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

/// Memory an idle instance costs the host, in KiB: anonymous plus kernel memory
/// (the page cache is shared and measured by the pagecache suite instead).
pub fn kernel_anon_kib(m: &HashMap<String, u64>) -> u64 {
    ["AnonPages", "Slab", "KernelStack", "PageTables", "Shmem"]
        .iter()
        .map(|k| m.get(*k).copied().unwrap_or(0))
        .sum()
}

pub fn get(m: &HashMap<String, u64>, key: &str) -> u64 {
    m.get(key).copied().unwrap_or(0)
}

/// Writes back dirty pages and drops clean caches, then lets the numbers settle.
pub fn settle() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
    std::thread::sleep(std::time::Duration::from_millis(1000));
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "MemTotal:       24576000 kB\nMemAvailable:   20000000 kB\nCached:           512000 kB\nAnonPages:        100 kB\nSlab:             200 kB\nKernelStack:       30 kB\nPageTables:         4 kB\nShmem:              1 kB\nHugePages_Total:       0\n";

    #[test]
    fn parses_and_sums() {
        let m = parse(SAMPLE);
        assert_eq!(get(&m, "MemTotal"), 24_576_000);
        assert_eq!(get(&m, "Cached"), 512_000);
        assert_eq!(get(&m, "HugePages_Total"), 0);
        assert_eq!(get(&m, "Missing"), 0);
        assert_eq!(kernel_anon_kib(&m), 335);
    }

    #[test]
    fn reads_this_host() {
        let m = read();
        assert!(get(&m, "MemTotal") > 0);
    }
}
