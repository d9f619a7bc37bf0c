//! The descriptor limit: every connection, database file and inbox file is
//! one, and the usual soft `RLIMIT_NOFILE` (1024) is far below what the
//! kernel allows (the hard limit). The daemon raises the soft limit to the
//! hard one at start; the API's listeners stay well below it (see
//! `http.max_connections`).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tracing::{info, warn};

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, and logs both.
/// Returns the soft limit in force afterwards (`None`: unlimited).
pub fn raise_nofile_limit() -> Option<u64> {
    let before = getrlimit(Resource::Nofile);
    let (soft, hard) = (before.current, before.maximum);
    if soft == hard {
        info!(
            soft = %limit_text(soft),
            hard = %limit_text(hard),
            "descriptor limit (RLIMIT_NOFILE) already at its hard limit"
        );
        return soft;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: hard,
            maximum: hard,
        },
    ) {
        Ok(()) => {
            info!(
                soft = %limit_text(soft),
                hard = %limit_text(hard),
                "descriptor limit (RLIMIT_NOFILE): soft limit raised to the hard limit"
            );
            hard
        }
        Err(e) => {
            warn!(
                soft = %limit_text(soft),
                hard = %limit_text(hard),
                "cannot raise the descriptor limit (RLIMIT_NOFILE) to its hard limit: {e}"
            );
            soft
        }
    }
}

fn limit_text(limit: Option<u64>) -> String {
    limit.map_or_else(|| "unlimited".into(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        // Raising soft to hard is allowed to any process, and idempotent.
        let hard = getrlimit(Resource::Nofile).maximum;
        assert_eq!(raise_nofile_limit(), hard);
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
        assert_eq!(raise_nofile_limit(), hard);
    }
}
