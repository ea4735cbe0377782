//! Hugging Face's sharding convention: which tensors go to which `model-0000i-of-0000N.safetensors`
//! file, and `model.safetensors.index.json`.
//!
//! Sources: `huggingface_hub/serialization/_base.py` (`split_state_dict_into_shards_factory`,
//! which transformers' `save_pretrained` calls through `split_torch_state_dict_into_shards`) and
//! transformers' `modeling_utils.py` (`save_pretrained`), whose rules are reproduced here:
//!
//! - Tensors are taken in state-dict order (the caller's declaration order). A tensor whose size
//!   is above the limit gets a shard of its own, **appended immediately, ahead of the shard still
//!   being filled**; otherwise, when the running size plus the tensor would exceed the limit, the
//!   current shard is closed and a new one started. Sizes are raw tensor bytes (no header).
//! - One shard is named `model.safetensors` and gets no index; `N > 1` shards are named
//!   `model-{i:05}-of-{N:05}.safetensors` (1-based).
//! - The index is `json.dumps({"metadata": {...}, "weight_map": {...}}, indent=2,
//!   sort_keys=True) + "\n"`, where `metadata` holds `total_size` (sum of all tensor bytes) and,
//!   in transformers 5, `total_parameters` (`model.num_parameters()`, which kiln cannot know, so
//!   the caller passes it or leaves it out), and `weight_map` maps every tensor to its file.
//! - Each file's `__metadata__` is `{"format": "pt"}`.
//!
//! Differences: huggingface_hub returns no file at all for an empty state dict; kiln writes one
//! empty `model.safetensors`. Tensors sharing storage (tied weights) do not exist here.

use std::collections::{BTreeMap, HashSet};

use super::{SafetensorsError, SafetensorsLayout, SafetensorsSlot, TensorDecl, TensorOrder};

/// The weights file of an unsharded model.
pub const SINGLE_FILE_NAME: &str = "model.safetensors";
/// The index of a sharded model.
pub const INDEX_FILE_NAME: &str = "model.safetensors.index.json";

/// File name of shard `index` (0-based) of `count`: `model-{index+1:05}-of-{count:05}.safetensors`,
/// or `model.safetensors` when `count` is 1.
pub fn shard_file_name(index: usize, count: usize) -> String {
    if count == 1 {
        SINGLE_FILE_NAME.to_string()
    } else {
        format!("model-{:05}-of-{count:05}.safetensors", index + 1)
    }
}

/// Assigns tensors to shards as huggingface_hub does (see the module docs): `sizes` in
/// state-dict order, result = one list of tensor indices per shard, in shard order. Every index
/// appears exactly once; an empty input gives no shards.
pub fn plan_hf_shards(sizes: &[u64], max_shard_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards = Vec::new();
    let mut current = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size > max_shard_bytes {
            shards.push(vec![i]);
            continue;
        }
        // `current_size + size > max` in Python's unbounded integers; both terms are at most
        // `max`, so saturation cannot change the outcome.
        if current_size.saturating_add(size) > max_shard_bytes {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// How to split and lay out a model's tensors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOptions {
    /// Largest shard in tensor bytes (`max_shard_size` in transformers); `None` writes one file.
    pub max_shard_bytes: Option<u64>,
    /// Tensor order within each file.
    pub order: TensorOrder,
    /// Each file's `__metadata__` (transformers writes `{"format": "pt"}`, the default).
    pub metadata: Option<BTreeMap<String, String>>,
    /// `total_parameters` for the index metadata, as transformers 5 writes it; `None` leaves the
    /// key out (transformers 4 and huggingface_hub write only `total_size`).
    pub total_parameters: Option<u64>,
}

impl Default for SetOptions {
    fn default() -> SetOptions {
        SetOptions {
            max_shard_bytes: None,
            order: TensorOrder::Safetensors,
            metadata: Some(BTreeMap::from([("format".to_string(), "pt".to_string())])),
            total_parameters: None,
        }
    }
}

/// One planned file of a set.
#[derive(Debug, Clone)]
pub struct PlannedShard {
    /// File name within the model folder.
    pub file_name: String,
    /// Its tensors, offsets and header.
    pub layout: SafetensorsLayout,
}

/// A model's tensors split into shard files, with the index, all decided before any data exists.
#[derive(Debug, Clone)]
pub struct SafetensorsSet {
    shards: Vec<PlannedShard>,
    /// Global write index of each shard's first tensor, plus the total count at the end.
    starts: Vec<usize>,
    total_size: u64,
    index: Option<Vec<u8>>,
}

impl SafetensorsSet {
    /// Plans the files for `tensors` (in state-dict order). Names must be unique across the whole
    /// set; sizes are checked.
    pub fn plan(
        tensors: Vec<TensorDecl>,
        options: &SetOptions,
    ) -> Result<SafetensorsSet, SafetensorsError> {
        if options.max_shard_bytes == Some(0) {
            return Err(SafetensorsError::ZeroShardSize);
        }
        let mut seen = HashSet::with_capacity(tensors.len());
        let mut sizes = Vec::with_capacity(tensors.len());
        let mut total_size = 0u64;
        for t in &tensors {
            if !seen.insert(t.name.as_str()) {
                return Err(SafetensorsError::DuplicateTensor(t.name.clone()));
            }
            let n = t.nbytes()?;
            total_size = total_size
                .checked_add(n)
                .ok_or_else(|| SafetensorsError::BadShape {
                    tensor: t.name.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                })?;
            sizes.push(n);
        }
        let groups = match options.max_shard_bytes {
            Some(max) if !tensors.is_empty() => plan_hf_shards(&sizes, max),
            _ => vec![(0..tensors.len()).collect()],
        };
        let count = groups.len();
        let mut slots: Vec<Option<TensorDecl>> = tensors.into_iter().map(Some).collect();
        let mut shards = Vec::with_capacity(count);
        let mut starts = Vec::with_capacity(count + 1);
        let mut start = 0;
        let mut weight_map = BTreeMap::new();
        for (i, group) in groups.into_iter().enumerate() {
            let file_name = shard_file_name(i, count);
            let decls: Vec<TensorDecl> = group
                .iter()
                .filter_map(|&t| slots.get_mut(t).and_then(Option::take))
                .collect();
            for d in &decls {
                weight_map.insert(d.name.clone(), file_name.clone());
            }
            let layout = SafetensorsLayout::new(decls, options.metadata.clone(), options.order)?;
            starts.push(start);
            start += layout.tensors().len();
            shards.push(PlannedShard { file_name, layout });
        }
        starts.push(start);
        let index =
            (count > 1).then(|| index_json(total_size, options.total_parameters, weight_map));
        Ok(SafetensorsSet {
            shards,
            starts,
            total_size,
            index,
        })
    }

    /// The files, in shard order.
    pub fn shards(&self) -> &[PlannedShard] {
        &self.shards
    }

    /// Whether the model is split (and has an index).
    pub fn is_sharded(&self) -> bool {
        self.shards.len() > 1
    }

    /// Sum of all tensor bytes (the index's `total_size`).
    pub fn total_size(&self) -> u64 {
        self.total_size
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of `model.safetensors.index.json`, when sharded.
    pub fn index_json(&self) -> Option<&[u8]> {
        self.index.as_deref()
    }

    /// Every tensor in write order (shard by shard, each in its file order), with its shard
    /// index. The position in this sequence is the index [`FolderWriter`](super::FolderWriter)
    /// expects.
    pub fn write_order(&self) -> impl Iterator<Item = (usize, &SafetensorsSlot)> + '_ {
        self.shards
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.layout.tensors().iter().map(move |t| (i, t)))
    }

    /// The write index of the tensor with this name.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.shards
            .iter()
            .zip(&self.starts)
            .find_map(|(s, &start)| s.layout.position(name).map(|p| start + p))
    }

    /// Shard and in-file index of write index `index`.
    pub(crate) fn locate(&self, index: usize) -> Option<(usize, usize)> {
        if index >= self.len() {
            return None;
        }
        // `starts` is non-decreasing; the shard is the last one starting at or before `index`.
        let shard = self.starts.partition_point(|&s| s <= index) - 1;
        Some((shard, index - self.starts[shard]))
    }

    /// Write index of shard `shard`'s first tensor.
    pub(crate) fn start_of(&self, shard: usize) -> usize {
        self.starts
            .get(shard)
            .copied()
            .unwrap_or_else(|| self.len())
    }
}

fn index_json(
    total_size: u64,
    total_parameters: Option<u64>,
    weight_map: BTreeMap<String, String>,
) -> Vec<u8> {
    let mut metadata = serde_json::Map::new();
    if let Some(p) = total_parameters {
        metadata.insert("total_parameters".into(), p.into());
    }
    metadata.insert("total_size".into(), total_size.into());
    let map: serde_json::Map<String, serde_json::Value> = weight_map
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let mut root = serde_json::Map::new();
    root.insert("metadata".into(), metadata.into());
    root.insert("weight_map".into(), map.into());
    let mut text = super::to_python_json(&serde_json::Value::Object(root), true);
    text.push('\n');
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::super::Dtype;
    use super::*;

    #[test]
    fn hub_docstring_example() {
        // "if the limit is 10GB and we have tensors of sizes [6GB, 6GB, 2GB, 6GB, 2GB, 2GB] they
        // will get sharded as [6GB], [6+2GB], [6+2+2GB]".
        assert_eq!(
            plan_hf_shards(&[6, 6, 2, 6, 2, 2], 10),
            vec![vec![0], vec![1, 2], vec![3, 4, 5]]
        );
    }

    #[test]
    fn oversized_tensor_jumps_ahead_of_the_open_shard() {
        assert_eq!(
            plan_hf_shards(&[2, 20, 3, 9], 10),
            vec![vec![1], vec![0, 2], vec![3]]
        );
        assert_eq!(plan_hf_shards(&[10, 10], 10), vec![vec![0], vec![1]]);
        assert_eq!(plan_hf_shards(&[0, 0, 10], 10), vec![vec![0, 1, 2]]);
        assert!(plan_hf_shards(&[], 10).is_empty());
    }

    #[test]
    fn names_and_index() {
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(1, 3), "model-00002-of-00003.safetensors");
        let decls = vec![
            TensorDecl::new("z", Dtype::F32, vec![4]),
            TensorDecl::new("a", Dtype::F32, vec![4]),
            TensorDecl::new("m", Dtype::U8, vec![4]),
        ];
        let set = SafetensorsSet::plan(
            decls,
            &SetOptions {
                max_shard_bytes: Some(20),
                total_parameters: Some(40),
                ..SetOptions::default()
            },
        )
        .unwrap();
        assert!(set.is_sharded());
        assert_eq!(set.total_size(), 36);
        let index = String::from_utf8(set.index_json().unwrap().to_vec()).unwrap();
        assert_eq!(
            index,
            "{\n  \"metadata\": {\n    \"total_parameters\": 40,\n    \"total_size\": 36\n  },\n  \
             \"weight_map\": {\n    \"a\": \"model-00002-of-00002.safetensors\",\n    \
             \"m\": \"model-00002-of-00002.safetensors\",\n    \
             \"z\": \"model-00001-of-00002.safetensors\"\n  }\n}\n"
        );
        let order: Vec<(usize, &str)> = set
            .write_order()
            .map(|(s, t)| (s, t.decl.name.as_str()))
            .collect();
        assert_eq!(order, vec![(0, "z"), (1, "a"), (1, "m")]);
        assert_eq!(set.position("m"), Some(2));
        assert_eq!(set.locate(2), Some((1, 1)));
        assert_eq!(set.locate(3), None);
    }

    #[test]
    fn single_file_and_rejections() {
        let set = SafetensorsSet::plan(
            vec![TensorDecl::new("a", Dtype::F32, vec![4])],
            &SetOptions {
                max_shard_bytes: Some(1 << 30),
                ..SetOptions::default()
            },
        )
        .unwrap();
        assert!(!set.is_sharded());
        assert_eq!(set.shards()[0].file_name, SINGLE_FILE_NAME);
        assert!(set.index_json().is_none());
        let empty = SafetensorsSet::plan(vec![], &SetOptions::default()).unwrap();
        assert_eq!(empty.shards().len(), 1);
        assert!(empty.is_empty());
        assert!(matches!(
            SafetensorsSet::plan(
                vec![
                    TensorDecl::new("a", Dtype::F32, vec![4]),
                    TensorDecl::new("a", Dtype::F32, vec![4])
                ],
                &SetOptions {
                    max_shard_bytes: Some(4),
                    ..SetOptions::default()
                }
            ),
            Err(SafetensorsError::DuplicateTensor(_))
        ));
        assert!(matches!(
            SafetensorsSet::plan(
                vec![],
                &SetOptions {
                    max_shard_bytes: Some(0),
                    ..SetOptions::default()
                }
            ),
            Err(SafetensorsError::ZeroShardSize)
        ));
    }
}
