//! Where the cores went during a measured window: how long each group of processes ran on a
//! core, and how long its threads were runnable but waited for one, from Linux's per-thread
//! scheduler counters (`/proc/<pid>/task/<tid>/schedstat`) and the machine's `/proc/stat`.
//!
//! On the build machine PostgreSQL, the server, the bench and its worker share two cores. A
//! closed loop such as W3 passes through several of them per round, and at each hop the woken
//! thread first waits for a core: a cost that per-process CPU time and profiles do not show,
//! and that a machine with idle cores would not have. These figures show it for every run.
//! Where the counters cannot be read (not Linux), nothing is reported.

use std::{collections::HashMap, fs, time::Instant};

use crate::{
    cluster::{Server, WorkerProcess},
    workloads::Report,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Group {
    Postgres,
    Server,
    Clients,
}

impl Group {
    const ALL: [Group; 3] = [Group::Postgres, Group::Server, Group::Clients];

    fn name(self) -> &'static str {
        match self {
            Group::Postgres => "postgres",
            Group::Server => "server",
            Group::Clients => "clients",
        }
    }
}

/// A thread's nanoseconds on a core, nanoseconds runnable but waiting, and times scheduled in.
type Counters = [u64; 3];

/// Every thread of the watched processes, by (pid, tid).
type Snapshot = HashMap<(u32, u32), (Group, Counters)>;

/// The counters at the start of a window.
pub struct Window {
    server: Vec<u32>,
    clients: Vec<u32>,
    start: Snapshot,
    machine: Option<(u64, u64)>,
    opened: Instant,
}

impl Window {
    /// Starts a window over `server`, this process and `worker`, and every PostgreSQL process
    /// on the machine.
    pub fn open(server: &Server, worker: &WorkerProcess) -> Self {
        Self::over(vec![server.pid()], worker.pid().into_iter().collect())
    }

    /// [`open`](Self::open) for any server and worker processes.
    fn over(server: Vec<u32>, workers: Vec<u32>) -> Self {
        let mut clients = workers;
        clients.push(std::process::id());
        let start = snapshot(&server, &clients);
        Self {
            machine: machine_busy(),
            opened: Instant::now(),
            server,
            clients,
            start,
        }
    }

    /// Ends the window and adds its figures to `report`: `window_ms`, `cores_busy_pct` (of
    /// every core) and, per group, `{group}_cpu_ms`, `{group}_runqueue_ms` (runnable, waiting
    /// for a core) and `{group}_timeslices`. Call it before the processes exit: a thread gone
    /// by then is left out. A thread that started within the window counts from its start.
    pub fn close(self, report: &mut Report) {
        let window = self.opened.elapsed();
        let end = snapshot(&self.server, &self.clients);
        if end.is_empty() {
            return;
        }
        let mut totals: HashMap<Group, Counters> = HashMap::new();
        for (thread, (group, now)) in &end {
            let before = self.start.get(thread).map_or([0; 3], |(_, c)| *c);
            let total = totals.entry(*group).or_default();
            for i in 0..3 {
                total[i] += now[i].saturating_sub(before[i]);
            }
        }
        let ms = |nanos: u64| (nanos as f64 / 100_000.0).round() / 10.0;
        report.insert(
            "window_ms".into(),
            ((window.as_secs_f64() * 10_000.0).round() / 10.0).into(),
        );
        if let (Some((busy0, all0)), Some((busy1, all1))) = (self.machine, machine_busy())
            && all1 > all0
        {
            let pct = 100.0 * (busy1.saturating_sub(busy0)) as f64 / (all1 - all0) as f64;
            report.insert("cores_busy_pct".into(), pct.round().into());
        }
        for group in Group::ALL {
            let [cpu, wait, slices] = totals.get(&group).copied().unwrap_or_default();
            let name = group.name();
            report.insert(format!("{name}_cpu_ms"), ms(cpu).into());
            report.insert(format!("{name}_runqueue_ms"), ms(wait).into());
            report.insert(format!("{name}_timeslices"), slices.into());
        }
    }
}

/// The counters of every thread of `server`, `clients` and the processes named `postgres`.
fn snapshot(server: &[u32], clients: &[u32]) -> Snapshot {
    let mut threads = Snapshot::new();
    let mut add = |pid: u32, group: Group| {
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        for task in tasks.flatten() {
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            if let Some(counters) = fs::read_to_string(task.path().join("schedstat"))
                .ok()
                .as_deref()
                .and_then(parse_schedstat)
            {
                threads.insert((pid, tid), (group, counters));
            }
        }
    };
    for &pid in server {
        add(pid, Group::Server);
    }
    for &pid in clients {
        add(pid, Group::Clients);
    }
    if let Ok(processes) = fs::read_dir("/proc") {
        for process in processes.flatten() {
            let Some(pid) = process.file_name().to_str().and_then(|p| p.parse().ok()) else {
                continue;
            };
            let named_postgres = fs::read_to_string(process.path().join("comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres");
            if named_postgres {
                add(pid, Group::Postgres);
            }
        }
    }
    threads
}

/// `on-core-ns waiting-ns timeslices`.
fn parse_schedstat(text: &str) -> Option<Counters> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some([fields.next()??, fields.next()??, fields.next()??])
}

/// The machine's busy and total time over all cores, in clock ticks (`/proc/stat`'s `cpu`
/// line; idle and I/O wait are not busy).
fn machine_busy() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_lines_parse() {
        assert_eq!(
            parse_schedstat("123 456 7\n"),
            Some([123, 456, 7]),
            "on-core, waiting, timeslices"
        );
        assert_eq!(parse_schedstat("123 x 7"), None);
        assert_eq!(parse_schedstat("123"), None);
    }

    #[test]
    fn a_window_counts_this_process() {
        let window = Window::over(Vec::new(), Vec::new());
        // Some work of our own, so the window has something to count.
        let mut x = 0_u64;
        for i in 0..5_000_000_u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let mut report = Report::new();
        window.close(&mut report);
        if fs::metadata("/proc/self/schedstat").is_err() {
            assert!(report.is_empty(), "no counters, no figures");
            return;
        }
        let cpu = report["clients_cpu_ms"].as_f64().expect("a number");
        assert!(cpu > 0.0, "this process ran: {report:?}");
        assert!(report["window_ms"].as_f64().expect("a number") > 0.0);
        assert_eq!(report["server_cpu_ms"], serde_json::json!(0.0));
    }
}
