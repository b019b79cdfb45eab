//! The one failure every layer that takes table names shares.

/// A table that was asked for but that the source cannot deliver. Setup, subscriptions,
/// streams and initial states each wrap it, so it reads the same from all of them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// No such table in the source database.
    #[error("table {0} does not exist")]
    Missing(String),
    /// The table exists but is not in the source's publication.
    #[error("table {0} is not one of the source's published tables, so it is neither delivered nor exported: add it to the publication (ALTER PUBLICATION ... ADD TABLE)")]
    NotPublished(String),
    /// A partitioned table whose partitions the publication sends each under its own name
    /// (`publish_via_partition_root` is off): no change ever arrives under the root.
    #[error("table {0} is partitioned and the publication sends its changes under each partition's own name (publish_via_partition_root is off), so none arrives under {0}: use the partitions' names, or ALTER PUBLICATION ... SET (publish_via_partition_root = true)")]
    PartitionRoot(String),
}
