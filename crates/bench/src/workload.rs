//! The workload: which accounts exist, and which transfers each client sends. The same
//! generator drives every target (ledgerd, PostgreSQL), so their figures compare.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Workload knobs (see `ledger-bench --help`).
#[derive(Clone, Debug)]
pub struct Knobs {
    pub accounts: usize,
    pub hot_accounts: usize,
    pub hot_percent: u32,
    /// Zipf exponent for choosing accounts; None = uniform.
    pub zipf: Option<f64>,
    pub cross_percent: u32,
    pub batch: usize,
    pub pending_percent: u32,
    pub seed: u64,
}

/// Accounts are created in placement groups: accounts in one group share a placement key, so
/// a transfer inside a group is single-shard, and one between groups on different shards is
/// cross-shard. That is how the cross-shard ratio is controlled.
#[derive(Debug)]
pub struct Accounts {
    pub ids: Vec<String>,
    pub group_of: Vec<usize>,
    pub members: Vec<Vec<usize>>,
    /// The shard of each group, once the target has told us (ledgerd); all 0 otherwise.
    pub shard_of_group: Vec<u32>,
    zipf_cdf: Option<Vec<f64>>,
}

pub const GROUPS_MAX: usize = 1_024;

impl Accounts {
    pub fn new(knobs: &Knobs) -> Accounts {
        assert!(knobs.accounts >= 4, "at least 4 accounts");
        let groups = (knobs.accounts / 2).clamp(1, GROUPS_MAX);
        let ids: Vec<String> = (0..knobs.accounts).map(|i| format!("acct-{i}")).collect();
        let group_of: Vec<usize> = (0..knobs.accounts).map(|i| i % groups).collect();
        let mut members = vec![Vec::new(); groups];
        for (i, g) in group_of.iter().enumerate() {
            members[*g].push(i);
        }
        let zipf_cdf = knobs.zipf.map(|s| {
            let mut total = 0.0;
            (1..=knobs.accounts)
                .map(|rank| {
                    total += 1.0 / (rank as f64).powf(s);
                    total
                })
                .collect()
        });
        Accounts {
            ids,
            group_of,
            members,
            shard_of_group: vec![0; groups],
            zipf_cdf,
        }
    }

    pub fn placement_key(&self, i: usize) -> String {
        format!("g{}", self.group_of[i])
    }

    fn pick(&self, rng: &mut StdRng) -> usize {
        match &self.zipf_cdf {
            None => rng.random_range(0..self.ids.len()),
            Some(cdf) => {
                let u = rng.random::<f64>() * cdf.last().copied().unwrap_or(1.0);
                cdf.partition_point(|c| *c < u).min(self.ids.len() - 1)
            }
        }
    }
}

/// One transfer to send. Amounts are small integers; holds are posted in full later.
#[derive(Clone, Debug)]
pub enum Op {
    Posted {
        id: String,
        debit: usize,
        credit: usize,
        amount: u64,
    },
    Hold {
        id: String,
        debit: usize,
        credit: usize,
        amount: u64,
    },
    Post {
        id: String,
        pending_id: String,
        amount: u64,
    },
}

impl Op {
    pub fn id(&self) -> &str {
        match self {
            Op::Posted { id, .. } | Op::Hold { id, .. } | Op::Post { id, .. } => id,
        }
    }
}

/// Per-client generator.
pub struct Generator {
    rng: StdRng,
    prefix: String,
    next: u64,
    holds: std::collections::VecDeque<(String, u64)>,
}

impl Generator {
    pub fn new(knobs: &Knobs, run: &str, client: usize) -> Self {
        Generator {
            rng: StdRng::seed_from_u64(
                knobs.seed ^ (client as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ),
            prefix: format!("{run}-{client}"),
            next: 0,
            holds: Default::default(),
        }
    }

    pub fn next(&mut self, knobs: &Knobs, accounts: &Accounts) -> Op {
        self.next += 1;
        let id = format!("{}-{}", self.prefix, self.next);
        let roll = self.rng.random_range(0..200);
        if roll < knobs.pending_percent && !self.holds.is_empty() {
            let (pending_id, amount) = self.holds.pop_front().expect("non-empty");
            return Op::Post {
                id,
                pending_id,
                amount,
            };
        }
        let debit = if knobs.hot_accounts > 0 && self.rng.random_range(0..100) < knobs.hot_percent {
            self.rng
                .random_range(0..knobs.hot_accounts.min(accounts.ids.len()))
        } else {
            accounts.pick(&mut self.rng)
        };
        let credit = self.credit_for(knobs, accounts, debit);
        let amount = self.rng.random_range(1..=1_000);
        if roll < 2 * knobs.pending_percent {
            self.holds.push_back((id.clone(), amount));
            Op::Hold {
                id,
                debit,
                credit,
                amount,
            }
        } else {
            Op::Posted {
                id,
                debit,
                credit,
                amount,
            }
        }
    }

    fn credit_for(&mut self, knobs: &Knobs, accounts: &Accounts, debit: usize) -> usize {
        let group = accounts.group_of[debit];
        let cross = self.rng.random_range(0..100) < knobs.cross_percent;
        if cross {
            let home = accounts.shard_of_group[group];
            for _ in 0..64 {
                let c = self.rng.random_range(0..accounts.ids.len());
                if accounts.shard_of_group[accounts.group_of[c]] != home {
                    return c;
                }
            }
        }
        let members = &accounts.members[group];
        loop {
            let c = members[self.rng.random_range(0..members.len())];
            if c != debit || members.len() == 1 {
                return if c == debit {
                    (debit + 1) % accounts.ids.len()
                } else {
                    c
                };
            }
        }
    }
}
