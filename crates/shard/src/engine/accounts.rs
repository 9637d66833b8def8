//! The accounts a leader holds, by id: a hash table of accounts that finds each by its own id.
//!
//! A `HashMap<String, Account>` held each id twice, the key (24 bytes in the table, which is a
//! power of two long and at most 7/8 full, and a heap copy of the id) and the account's own:
//! 45-98 MiB at peak with a million accounts (docs/benchmarks.md). The accounts stay in the
//! table: a table of positions into a vector of accounts took 100 MiB more off, but a lookup
//! then missed the cache once more, and (e) ran 3-9% slower. Accounts are never removed.

use std::hash::BuildHasher;
use std::ops::Index;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use hashbrown::hash_table::Entry;

use ledger_domain::Account;

#[derive(Default)]
pub struct Accounts {
    table: HashTable<Account>,
    /// Seeded per table, as the engine's other maps of client-chosen ids are.
    hasher: RandomState,
}

impl std::fmt::Debug for Accounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accounts")
            .field("len", &self.table.len())
            .finish_non_exhaustive()
    }
}

impl Accounts {
    pub fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn get(&self, id: &str) -> Option<&Account> {
        let hash = self.hasher.hash_one(id);
        self.table.find(hash, |a| a.spec.id == id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Account> {
        let hash = self.hasher.hash_one(id);
        self.table.find_mut(hash, |a| a.spec.id == id)
    }

    /// Adds `account`, or replaces the one with its id.
    pub fn insert(&mut self, account: Account) {
        let hasher = &self.hasher;
        let hash = hasher.hash_one(account.spec.id.as_str());
        match self.table.entry(
            hash,
            |a| a.spec.id == account.spec.id,
            |a| hasher.hash_one(a.spec.id.as_str()),
        ) {
            Entry::Occupied(mut found) => *found.get_mut() = account,
            Entry::Vacant(vacant) => {
                vacant.insert(account);
            }
        }
    }
}

impl Index<&str> for Accounts {
    type Output = Account;

    fn index(&self, id: &str) -> &Account {
        self.get(id)
            .unwrap_or_else(|| panic!("account {id:?} is not on this shard"))
    }
}

impl FromIterator<Account> for Accounts {
    fn from_iter<I: IntoIterator<Item = Account>>(accounts: I) -> Self {
        let accounts = accounts.into_iter();
        let mut table = Accounts::default();
        let hasher = &table.hasher;
        table.table.reserve(accounts.size_hint().0, |a| {
            hasher.hash_one(a.spec.id.as_str())
        });
        for account in accounts {
            table.insert(account);
        }
        table
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ledger_domain::NewAccount;

    use super::*;

    fn account(id: &str, version: u64) -> Account {
        Account {
            spec: NewAccount {
                id: id.into(),
                ledger: "USD".into(),
                placement_key: id.into(),
                ..Default::default()
            },
            balances: Default::default(),
            version,
            created_at_ms: 0,
        }
    }

    /// Inserts, replacements and lookups (found and missing) agree with a plain map, through
    /// the index's growth from empty and from a collected start.
    #[test]
    fn the_table_finds_what_a_map_holds() {
        let start: Vec<Account> = (0..500).map(|i| account(&format!("a{i}"), 0)).collect();
        let mut model: HashMap<String, u64> =
            start.iter().map(|a| (a.spec.id.clone(), 0)).collect();
        for mut table in [start.into_iter().collect::<Accounts>(), Accounts::default()] {
            if table.is_empty() {
                model.clear();
            }
            for step in 0..20_000u64 {
                let id = format!("a{}", (step * 7_919) % 3_000);
                let version = step + 1;
                if step % 3 == 0 {
                    table.insert(account(&id, version));
                    model.insert(id.clone(), version);
                } else if step % 3 == 1
                    && let Some(a) = table.get_mut(&id)
                {
                    a.version = version;
                    model.insert(id.clone(), version);
                }
                assert_eq!(
                    table.get(&id).map(|a| a.version),
                    model.get(&id).copied(),
                    "{id}"
                );
                assert!(table.get(&format!("missing{step}")).is_none());
            }
            assert_eq!(table.len(), model.len());
            for (id, version) in &model {
                assert_eq!(table[id.as_str()].version, *version);
                assert_eq!(table[id.as_str()].spec.id, *id);
            }
        }
    }
}
