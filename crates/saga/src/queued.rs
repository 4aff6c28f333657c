//! The writes both stores hand to their one writer (a thread for SQLite, a task for
//! PostgreSQL) through a bounded queue, each with the channel its answer comes back on once the
//! write is committed. The [`crate::SagaStore`] write methods only build one of these.

use tokio::sync::oneshot;

use crate::{Append, Created, Entry, NewSaga, SagaRecord, StoreError};

pub(crate) type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(crate) enum Op {
    Create {
        saga: NewSaga,
        first: Vec<Entry>,
        owner: String,
        lease_until_ms: i64,
        reply: Reply<Created>,
    },
    Append {
        append: Append,
        reply: Reply<()>,
    },
    Renew {
        owner: String,
        ids: Vec<String>,
        lease_until_ms: i64,
        reply: Reply<Vec<String>>,
    },
    Claim {
        owner: String,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
        reply: Reply<Vec<SagaRecord>>,
    },
    Release {
        owner: String,
        ids: Vec<String>,
        reply: Reply<()>,
    },
}

impl Op {
    pub(crate) fn create(
        saga: &NewSaga,
        first: &[Entry],
        owner: &str,
        lease_until_ms: i64,
    ) -> impl FnOnce(Reply<Created>) -> Op + use<> {
        let (saga, first, owner) = (saga.clone(), first.to_vec(), owner.to_owned());
        move |reply| Op::Create {
            saga,
            first,
            owner,
            lease_until_ms,
            reply,
        }
    }

    pub(crate) fn append(append: Append) -> impl FnOnce(Reply<()>) -> Op {
        move |reply| Op::Append { append, reply }
    }

    pub(crate) fn renew(
        owner: &str,
        ids: &[String],
        lease_until_ms: i64,
    ) -> impl FnOnce(Reply<Vec<String>>) -> Op + use<> {
        let (owner, ids) = (owner.to_owned(), ids.to_vec());
        move |reply| Op::Renew {
            owner,
            ids,
            lease_until_ms,
            reply,
        }
    }

    pub(crate) fn claim(
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
        limit: u32,
    ) -> impl FnOnce(Reply<Vec<SagaRecord>>) -> Op + use<> {
        let owner = owner.to_owned();
        move |reply| Op::Claim {
            owner,
            now_ms,
            lease_until_ms,
            limit,
            reply,
        }
    }

    pub(crate) fn release(owner: &str, ids: &[String]) -> impl FnOnce(Reply<()>) -> Op + use<> {
        let (owner, ids) = (owner.to_owned(), ids.to_vec());
        move |reply| Op::Release { owner, ids, reply }
    }
}
