//! Paged KV-cache bookkeeping: which blocks each sequence holds. No KV data lives here; the
//! executor owns the tensors and this module tells it which block ids to read and write.

mod block_pool;
pub mod hash;
mod manager;

pub use block_pool::{BlockHash, BlockId, BlockPool};
pub use manager::{BlockCopy, KvManager, SeqId};
