//! The run's random streams, by name. Each is a fork of the seed's generator with a fixed tag:
//! every stream is independent of the others and of the order in which folds run, and the tags
//! are the ones the streams have always had, so results keep their bits. A new consumer of
//! randomness gets a new named stream (and tag) here rather than forking in place.

use crate::rng::Rng;

/// The tags, in one place. Root level: [`FOLDS`], [`FOLD`]` + f`, [`REBUILD`]. Fold level:
/// [`LABEL_SPLIT`], [`TEACHER_INIT`]` + k`, [`TEACHER_ORDER`]` + k`, [`STUDENT_INIT`],
/// [`SIMPLE_ORDER`], [`FINETUNE_ORDER`], [`GENERATION`]` + g`. Generation level: [`PEER_INIT`],
/// [`REGRESSOR_INIT`]; on the batch order: [`AUGMENT`]. The per-teacher tags stay distinct for up
/// to 10 teachers (the 11th teacher's would reuse the first one's batch-order tag).
mod tag {
    pub const FOLDS: u64 = 1;
    pub const FOLD: u64 = 100;
    pub const REBUILD: u64 = u64::MAX;
    pub const LABEL_SPLIT: u64 = 2;
    pub const TEACHER_INIT: u64 = 10;
    pub const TEACHER_ORDER: u64 = 20;
    pub const STUDENT_INIT: u64 = 30;
    pub const SIMPLE_ORDER: u64 = 31;
    pub const FINETUNE_ORDER: u64 = 50;
    pub const GENERATION: u64 = 60;
    pub const PEER_INIT: u64 = 33;
    pub const REGRESSOR_INIT: u64 = 34;
    pub const AUGMENT: u64 = 77;
}

/// The streams of a whole run (from `Config::seed`).
#[derive(Clone, Debug)]
pub struct RunStreams(Rng);

impl RunStreams {
    pub fn new(seed: u64) -> Self {
        RunStreams(Rng::new(seed))
    }

    /// The k-fold split.
    pub fn folds(&self) -> Rng {
        self.0.fork(tag::FOLDS)
    }

    /// Everything fold `f` draws.
    pub fn fold(&self, f: usize) -> FoldStreams {
        FoldStreams(self.0.fork(tag::FOLD + f as u64))
    }

    /// The initialisation of a network rebuilt only to receive trained weights (its values are
    /// overwritten; `run_parallel` uses it for the last fold's models).
    pub fn rebuild(&self) -> Rng {
        self.0.fork(tag::REBUILD)
    }
}

/// The streams of one fold.
#[derive(Clone, Debug)]
pub struct FoldStreams(Rng);

impl FoldStreams {
    /// The labelled / unlabelled split of the training fold.
    pub fn label_split(&self) -> Rng {
        self.0.fork(tag::LABEL_SPLIT)
    }

    /// Teacher `k`'s initialisation.
    pub fn teacher_init(&self, k: usize) -> Rng {
        self.0.fork(tag::TEACHER_INIT + k as u64)
    }

    /// Teacher `k`'s batch order.
    pub fn teacher_order(&self, k: usize) -> Rng {
        self.0.fork(tag::TEACHER_ORDER + k as u64)
    }

    /// The student's initialisation, shared by the simple model and by every distilled student
    /// (each generation of born-again networks included), so that the comparison isolates what
    /// the teacher adds.
    pub fn student_init(&self) -> Rng {
        self.0.fork(tag::STUDENT_INIT)
    }

    /// The simple model's batch order.
    pub fn simple_order(&self) -> Rng {
        self.0.fork(tag::SIMPLE_ORDER)
    }

    /// The batch order of the distilled student's hard-label fine-tuning.
    pub fn finetune_order(&self) -> Rng {
        self.0.fork(tag::FINETUNE_ORDER)
    }

    /// Distillation round `g` (0 unless the method has several generations).
    pub fn generation(&self, g: usize) -> GenerationStreams {
        GenerationStreams(self.0.fork(tag::GENERATION + g as u64))
    }
}

/// The streams of one distillation round.
#[derive(Clone, Debug)]
pub struct GenerationStreams(Rng);

impl GenerationStreams {
    /// The initialisation of mutual learning's second network.
    pub fn peer_init(&self) -> Rng {
        self.0.fork(tag::PEER_INIT)
    }

    /// The initialisation of the FitNets regressor.
    pub fn regressor_init(&self) -> Rng {
        self.0.fork(tag::REGRESSOR_INIT)
    }

    /// The batch order: the unlabelled pool's first shuffle, then each epoch's labelled batches
    /// and the pool's reshuffles, all drawn from this one stream in turn.
    pub fn order(&self) -> Rng {
        self.0.clone()
    }

    /// The augmentation of the student's inputs: forked from the batch-order stream `order` as it
    /// stands after the pool's first shuffle.
    pub fn augment(order: &Rng) -> Rng {
        order.fork(tag::AUGMENT)
    }
}
