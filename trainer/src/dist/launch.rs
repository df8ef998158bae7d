//! Who this process is in a data-parallel job, read from the launcher's variables: torchrun's
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`,
//! `TORCHELASTIC_USE_AGENT_STORE`) when set, else Slurm's for a task started by `srun`
//! (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`, `SLURM_STEP_TASKS_PER_NODE`,
//! `SLURM_STEP_NODELIST`, `SLURM_JOB_ID`), else one process.

use crate::error::TrainError;

/// Port `srun` jobs rendezvous on when `MASTER_PORT` is unset: this base plus the job id
/// modulo 10,000, so two jobs sharing a node do not collide.
pub const SLURM_PORT_BASE: u16 = 20_000;

/// Which launcher's variables described this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// No launcher: one process.
    Single,
    /// `RANK` / `WORLD_SIZE` and friends (torchrun, `motley train --nproc`, by hand).
    Torchrun,
    /// A task of a Slurm job step (`srun`).
    Slurm,
}

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    pub world: usize,
    /// Rank among the processes of this node: picks `cuda:LOCAL_RANK`.
    pub local_rank: usize,
    /// Processes on this node: they share its cores.
    pub local_world: usize,
    /// The rendezvous store's host and port.
    pub master_addr: String,
    pub master_port: u16,
    /// A launcher agent (torchrun's, or `motley train --nproc`) serves the store; every rank is
    /// a client. Otherwise rank 0 serves it.
    pub agent_store: bool,
    /// torchrun's restart count: each attempt gets its own store namespace.
    pub restart: u64,
}

impl Launch {
    /// One process, no communication.
    pub fn single() -> Self {
        Launch {
            launcher: Launcher::Single,
            rank: 0,
            world: 1,
            local_rank: 0,
            local_world: 1,
            master_addr: String::new(),
            master_port: 0,
            agent_store: false,
            restart: 0,
        }
    }

    /// From the process environment.
    pub fn from_env() -> Result<Self, TrainError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// From any variable lookup (tests set variables without touching the environment).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, TrainError> {
        let var = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if var("WORLD_SIZE").is_some() || var("RANK").is_some() {
            torchrun(&var)
        } else if var("SLURM_STEP_ID").is_some() && var("SLURM_PROCID").is_some() {
            slurm(&var)
        } else {
            Ok(Launch::single())
        }
    }

    /// Whether this process joins a process group: several ranks, or one rank that a launcher
    /// gave a rendezvous address (`torchrun --nproc-per-node 1` runs DDP with one rank, and so
    /// does motley: the same code path, a world of one).
    pub fn is_distributed(&self) -> bool {
        self.world > 1 || (self.launcher != Launcher::Single && !self.master_addr.is_empty() && self.master_port != 0)
    }
}

fn bad(msg: String) -> TrainError {
    TrainError::Distributed(msg)
}

fn int<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, TrainError> {
    v.parse().map_err(|_| bad(format!("launch variable {name}={v:?} is not a non-negative integer")))
}

fn required<T: std::str::FromStr>(
    var: &dyn Fn(&str) -> Option<String>,
    name: &str,
    why: &str,
) -> Result<T, TrainError> {
    let v = var(name).ok_or_else(|| bad(format!("launch variable {name} is not set ({why})")))?;
    int(name, &v)
}

fn optional<T: std::str::FromStr>(var: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<T>, TrainError> {
    var(name).map(|v| int(name, &v)).transpose()
}

/// Checks the numbers agree with each other.
fn checked(l: Launch, names: [&str; 4]) -> Result<Launch, TrainError> {
    let [rank, world, local_rank, local_world] = names;
    if l.world == 0 {
        return Err(bad(format!("{world}=0: a job needs at least one process")));
    }
    if l.rank >= l.world {
        return Err(bad(format!("{rank}={} is not below {world}={}", l.rank, l.world)));
    }
    if l.local_world == 0 || l.local_world > l.world {
        return Err(bad(format!("{local_world}={} must be between 1 and {world}={}", l.local_world, l.world)));
    }
    if l.local_rank >= l.local_world {
        return Err(bad(format!("{local_rank}={} is not below {local_world}={}", l.local_rank, l.local_world)));
    }
    if l.world > 1 && l.master_addr.is_empty() {
        return Err(bad(format!("{world}={} but no rendezvous address (set MASTER_ADDR)", l.world)));
    }
    if l.world > 1 && l.master_port == 0 {
        return Err(bad(format!("{world}={} but no rendezvous port (set MASTER_PORT)", l.world)));
    }
    Ok(l)
}

fn torchrun(var: &dyn Fn(&str) -> Option<String>) -> Result<Launch, TrainError> {
    let world: usize = required(var, "WORLD_SIZE", "RANK is set")?;
    let rank: usize = required(var, "RANK", "WORLD_SIZE is set")?;
    let local_world: usize = optional(var, "LOCAL_WORLD_SIZE")?.unwrap_or(1);
    let local_rank: usize = optional(var, "LOCAL_RANK")?.unwrap_or(0);
    let (master_addr, master_port) = if world > 1 {
        let addr = var("MASTER_ADDR").ok_or_else(|| bad(format!("WORLD_SIZE={world} but MASTER_ADDR is not set")))?;
        (addr, required(var, "MASTER_PORT", "WORLD_SIZE > 1")?)
    } else {
        (var("MASTER_ADDR").unwrap_or_default(), optional(var, "MASTER_PORT")?.unwrap_or(0))
    };
    let agent_store = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let restart = optional(var, "TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0);
    checked(
        Launch {
            launcher: Launcher::Torchrun,
            rank,
            world,
            local_rank,
            local_world,
            master_addr,
            master_port,
            agent_store,
            restart,
        },
        ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"],
    )
}

fn slurm(var: &dyn Fn(&str) -> Option<String>) -> Result<Launch, TrainError> {
    let rank: usize = required(var, "SLURM_PROCID", "srun sets it")?;
    let world: usize = match optional(var, "SLURM_STEP_NUM_TASKS")? {
        Some(n) => n,
        None => required(var, "SLURM_NTASKS", "srun sets it")?,
    };
    let local_rank: usize = optional(var, "SLURM_LOCALID")?.unwrap_or(0);
    let node: usize = optional(var, "SLURM_NODEID")?.unwrap_or(0);
    let per_node = var("SLURM_STEP_TASKS_PER_NODE").or_else(|| var("SLURM_TASKS_PER_NODE"));
    let local_world = match per_node {
        Some(spec) => tasks_on_node(&spec, node)
            .ok_or_else(|| bad(format!("cannot read SLURM_STEP_TASKS_PER_NODE={spec:?} for node {node}")))?,
        None => 1,
    };
    let master_addr = match var("MASTER_ADDR") {
        Some(a) => a,
        None => {
            let list = var("SLURM_STEP_NODELIST")
                .or_else(|| var("SLURM_NODELIST"))
                .ok_or_else(|| bad("neither MASTER_ADDR nor SLURM_STEP_NODELIST is set".into()))?;
            first_host(&list).ok_or_else(|| bad(format!("cannot read the first host of SLURM_NODELIST={list:?}")))?
        }
    };
    let master_port = match optional::<u16>(var, "MASTER_PORT")? {
        Some(p) => p,
        None => {
            let job: u64 = required(var, "SLURM_JOB_ID", "MASTER_PORT is not set")?;
            SLURM_PORT_BASE + (job % 10_000) as u16
        }
    };
    checked(
        Launch {
            launcher: Launcher::Slurm,
            rank,
            world,
            local_rank,
            local_world,
            master_addr,
            master_port,
            agent_store: false,
            restart: 0,
        },
        ["SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"],
    )
}

/// Tasks on node `node` from Slurm's compressed per-node counts: `"4(x2),3"` is 4, 4, 3.
pub fn tasks_on_node(spec: &str, node: usize) -> Option<usize> {
    let mut seen = 0usize;
    for part in spec.split(',') {
        let (count, repeat) = match part.split_once("(x") {
            Some((c, r)) => (c.trim().parse::<usize>().ok()?, r.strip_suffix(')')?.trim().parse::<usize>().ok()?),
            None => (part.trim().parse::<usize>().ok()?, 1),
        };
        if node < seen + repeat {
            return Some(count);
        }
        seen += repeat;
    }
    None
}

/// The first host name of a Slurm host list: `"gpu[003-005,009],cpu01"` gives `gpu003`
/// (zero padding kept), `"node7"` gives `node7`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let first_end = {
        // The first top-level comma ends the first entry (commas inside brackets don't).
        let mut depth = 0i32;
        let mut end = list.len();
        for (i, c) in list.char_indices() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                ',' if depth == 0 => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        end
    };
    let entry = &list[..first_end];
    let Some((prefix, rest)) = entry.split_once('[') else {
        return (!entry.is_empty()).then(|| entry.to_string());
    };
    let (ranges, suffix) = rest.split_once(']')?;
    let first = ranges.split(',').next()?;
    let lo = first.split_once('-').map_or(first, |(lo, _)| lo).trim();
    if lo.is_empty() || !lo.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    Some(format!("{prefix}{lo}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k: &str| map.get(k).cloned()
    }

    #[test]
    fn no_launcher_is_one_process() {
        assert_eq!(Launch::from_vars(vars(&[])).expect("single"), Launch::single());
        // A batch script's own variables (no job step) are not a launch.
        let l = Launch::from_vars(vars(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")])).expect("single");
        assert_eq!(l.world, 1);
    }

    #[test]
    fn one_rank_with_a_rendezvous_joins_a_group_of_one() {
        let one = |pairs: &[(&str, &str)]| Launch::from_vars(vars(pairs)).expect("launch").is_distributed();
        assert!(one(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")]));
        assert!(!one(&[("RANK", "0"), ("WORLD_SIZE", "1")]));
        assert!(!Launch::single().is_distributed());
    }

    #[test]
    fn torchrun_variables() {
        let l = Launch::from_vars(vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ]))
        .expect("torchrun");
        assert_eq!(l.launcher, Launcher::Torchrun);
        assert_eq!((l.rank, l.world, l.local_rank, l.local_world), (5, 8, 1, 4));
        assert_eq!((l.master_addr.as_str(), l.master_port, l.agent_store, l.restart), ("node0", 29500, true, 2));
    }

    #[test]
    fn slurm_variables() {
        let l = Launch::from_vars(vars(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_PROCID", "6"),
            ("SLURM_STEP_NUM_TASKS", "11"),
            ("SLURM_LOCALID", "2"),
            ("SLURM_NODEID", "2"),
            ("SLURM_STEP_TASKS_PER_NODE", "4(x2),3"),
            ("SLURM_STEP_NODELIST", "gpu[007-009]"),
            ("SLURM_JOB_ID", "123456"),
        ]))
        .expect("slurm");
        assert_eq!(l.launcher, Launcher::Slurm);
        assert_eq!((l.rank, l.world, l.local_rank, l.local_world), (6, 11, 2, 3));
        assert_eq!((l.master_addr.as_str(), l.master_port), ("gpu007", SLURM_PORT_BASE + 3456));
        assert!(!l.agent_store);
    }

    #[test]
    fn missing_or_conflicting_variables_are_named() {
        let err = |pairs: &[(&str, &str)]| Launch::from_vars(vars(pairs)).expect_err("bad launch").to_string();
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not set"));
        assert!(
            err(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]).contains("RANK=2")
        );
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]).contains("MASTER_ADDR"));
        assert!(err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]).contains("MASTER_PORT"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK=\"x\""));
        let e = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ]);
        assert!(e.contains("LOCAL_RANK=2 is not below LOCAL_WORLD_SIZE=2"), "{e}");
        let e = err(&[("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "2")]);
        assert!(e.contains("SLURM_STEP_NODELIST"), "{e}");
    }

    #[test]
    fn slurm_host_lists_and_task_counts() {
        assert_eq!(first_host("gpu[003-005,009],cpu01").as_deref(), Some("gpu003"));
        assert_eq!(first_host("node7,node8").as_deref(), Some("node7"));
        assert_eq!(first_host("rack1-[10-12]-ib").as_deref(), Some("rack1-10-ib"));
        assert_eq!(first_host("n[x]"), None);
        assert_eq!(tasks_on_node("4(x2),3", 0), Some(4));
        assert_eq!(tasks_on_node("4(x2),3", 1), Some(4));
        assert_eq!(tasks_on_node("4(x2),3", 2), Some(3));
        assert_eq!(tasks_on_node("4(x2),3", 3), None);
        assert_eq!(tasks_on_node("8", 0), Some(8));
    }
}
