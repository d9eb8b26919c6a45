//! Memory of the new-call table per entry, measured: the process's resident
//! memory before and after filling a table with N entries (Linux
//! /proc/self/statm), divided by N. Prints one line per N.
//!
//! `cargo bench -p balancer --bench new_call_memory`

#![allow(clippy::unwrap_used, clippy::disallowed_methods, clippy::print_stdout)] // a measurement binary

use std::time::{Duration, Instant};

use balancer::core::new_calls::NewCallTable;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let now = Instant::now();
    for n in [100_000usize, 500_000, 1_000_000] {
        let before = rss_bytes();
        let mut table = NewCallTable::new(Duration::from_secs(32), n, (7, 11));
        for i in 0..n {
            let key = table.key(format!("{i:016x}@192.0.2.1").as_bytes());
            table.insert(now, key, (i % 64) as u16).unwrap();
        }
        let after = rss_bytes();
        println!(
            "new-call table: {n} entries, resident {:.1} MiB, {:.1} bytes/entry (estimate from layout: {} bytes/entry)",
            (after - before) as f64 / (1 << 20) as f64,
            (after - before) as f64 / n as f64,
            table.bytes_per_entry(),
        );
        drop(table);
    }
}
