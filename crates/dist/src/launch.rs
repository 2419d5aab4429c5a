//! Where a process sits in a torchrun- or Slurm-style launch, read from its environment, and
//! which bootstrap the NCCL backend takes. Plain Rust (no NCCL needed), so the rules are
//! tested on every build.
use crate::{Error, NcclBootstrap, Result};

/// Variables an MPI launcher sets on each rank (Open MPI, MPICH/Hydra, PMIx).
const MPI_LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"];

/// This process's place in a torchrun-style launch: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, and
/// where NCCL's bootstrap root listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnvLaunch {
    /// `RANK`.
    pub rank: usize,
    /// `WORLD_SIZE`.
    pub world: usize,
    /// `LOCAL_RANK`: the GPU this process drives.
    pub local_rank: usize,
    /// `host:port` for `NCCL_COMM_ID` (NCCL's own bootstrap: every rank derives the same id
    /// from it and rank 0 hosts the root there); `None` for a world of one.
    pub nccl_comm_id: Option<String>,
}

impl EnvLaunch {
    /// Reads the launch from this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads the launch from `var` (a lookup of environment variables).
    ///
    /// Neither `RANK` nor `WORLD_SIZE` set is a world of one (one GPU, no launcher).
    /// `NCCL_COMM_ID`, when set, is taken as it is; otherwise the root listens on
    /// `MASTER_ADDR` at `MASTER_PORT + 1`, because under torchrun its own rendezvous store
    /// already holds `MASTER_PORT`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let env_err = |m: String| Error::Env(format!("dist.nccl_bootstrap = \"env\": {m}"));
        let number = |k: &str| -> Result<Option<usize>> {
            var(k)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| env_err(format!("{k} = {v:?} is not a non-negative integer")))
                })
                .transpose()
        };
        let (rank, world) = match (number("RANK")?, number("WORLD_SIZE")?) {
            (None, None) => (0, 1),
            (Some(r), Some(w)) => (r, w),
            (r, _) => {
                let missing = if r.is_none() { "RANK" } else { "WORLD_SIZE" };
                return Err(env_err(format!(
                    "{missing} is not set (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; under \
                     Slurm, scripts/slurm-train.sh sets them from SLURM_PROCID, SLURM_NTASKS \
                     and SLURM_LOCALID)"
                )));
            }
        };
        if world == 0 || rank >= world {
            return Err(env_err(format!(
                "RANK = {rank} must be below WORLD_SIZE = {world}"
            )));
        }
        let local_rank = match number("LOCAL_RANK")? {
            Some(l) => l,
            None if world == 1 => 0,
            None => {
                return Err(env_err(
                    "LOCAL_RANK is not set: it names the GPU of this rank on its node".into(),
                ))
            }
        };
        let nccl_comm_id = match var("NCCL_COMM_ID") {
            Some(id) => Some(id),
            None if world == 1 => None,
            None => {
                let (Some(addr), Some(port)) = (var("MASTER_ADDR"), var("MASTER_PORT")) else {
                    return Err(env_err(
                        "MASTER_ADDR and MASTER_PORT must be set (or NCCL_COMM_ID = host:port) \
                         for the ranks to find each other"
                            .into(),
                    ));
                };
                let port = port
                    .trim()
                    .parse::<u16>()
                    .ok()
                    .and_then(|p| p.checked_add(1))
                    .ok_or_else(|| {
                        env_err(format!("MASTER_PORT = {port:?} is not a port below 65535"))
                    })?;
                // NCCL reads an IPv6 address in brackets.
                let host = if addr.contains(':') && !addr.starts_with('[') {
                    format!("[{addr}]")
                } else {
                    addr
                };
                Some(format!("{host}:{port}"))
            }
        };
        Ok(Self {
            rank,
            world,
            local_rank,
            nccl_comm_id,
        })
    }
}

/// The bootstrap NCCL takes: `auto` is MPI when this build has MPI and an MPI launcher
/// started the process, else the torchrun-style environment.
pub fn resolve_bootstrap(
    asked: NcclBootstrap,
    mpi_built: bool,
    var: impl Fn(&str) -> Option<String>,
) -> NcclBootstrap {
    match asked {
        NcclBootstrap::Auto if mpi_built && MPI_LAUNCHER_VARS.iter().any(|k| var(k).is_some()) => {
            NcclBootstrap::Mpi
        }
        NcclBootstrap::Auto => NcclBootstrap::Env,
        b => b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn torchrun_variables_give_rank_gpu_and_the_root_beside_master_port() {
        let l = EnvLaunch::from_vars(vars(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node001"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(
            l,
            EnvLaunch {
                rank: 5,
                world: 16,
                local_rank: 1,
                nccl_comm_id: Some("node001:29501".into())
            }
        );
        let v6 = EnvLaunch::from_vars(vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "fe80::1"),
            ("MASTER_PORT", "29500"),
        ]))
        .unwrap();
        assert_eq!(v6.nccl_comm_id.as_deref(), Some("[fe80::1]:29501"));
        let given = EnvLaunch::from_vars(vars(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("NCCL_COMM_ID", "10.0.0.1:4000"),
        ]))
        .unwrap();
        assert_eq!(given.nccl_comm_id.as_deref(), Some("10.0.0.1:4000"));
    }

    #[test]
    fn no_launcher_is_a_world_of_one() {
        let l = EnvLaunch::from_vars(vars(&[])).unwrap();
        assert_eq!(
            (l.rank, l.world, l.local_rank, l.nccl_comm_id),
            (0, 1, 0, None)
        );
    }

    #[test]
    fn an_incomplete_launch_names_what_is_missing_or_wrong() {
        let err = |kv: &[(&str, &str)]| EnvLaunch::from_vars(vars(kv)).unwrap_err().to_string();
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not set"));
        assert!(err(&[("WORLD_SIZE", "2")]).contains("RANK is not set"));
        assert!(err(&[("RANK", "2"), ("WORLD_SIZE", "2")]).contains("below WORLD_SIZE"));
        assert!(err(&[("RANK", "x"), ("WORLD_SIZE", "2")]).contains("RANK = \"x\""));
        let no_local = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")]);
        assert!(no_local.contains("LOCAL_RANK"), "{no_local}");
        let no_master = err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
        assert!(
            no_master.contains("MASTER_ADDR and MASTER_PORT"),
            "{no_master}"
        );
        let bad_port = err(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "65535"),
        ]);
        assert!(bad_port.contains("MASTER_PORT"), "{bad_port}");
    }

    #[test]
    fn auto_bootstrap_takes_mpi_only_when_built_and_launched_by_mpi() {
        let mpirun = vars(&[("OMPI_COMM_WORLD_RANK", "0")]);
        let torchrun = vars(&[("RANK", "0")]);
        use NcclBootstrap::*;
        assert_eq!(resolve_bootstrap(Auto, true, &mpirun), Mpi);
        assert_eq!(resolve_bootstrap(Auto, false, &mpirun), Env);
        assert_eq!(resolve_bootstrap(Auto, true, &torchrun), Env);
        assert_eq!(resolve_bootstrap(Env, true, &mpirun), Env);
        assert_eq!(resolve_bootstrap(Mpi, false, &torchrun), Mpi);
    }
}
