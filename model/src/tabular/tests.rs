//! Tables with missing values and categories, on generated data whose statistics are known.

use std::path::Path;

use super::*;

const SITE_A: &str = "\
age,stage,smoker,note,status
50,I,yes,,0
NA,II,no,,1
70,III,,,1
60,II,yes,,0
";

const SITE_B: &str = "\
status,age,stage,smoker,note
1,40,I,no,
0,,IV,yes,
";

fn schema() -> Schema {
    Schema::infer(
        SITE_A,
        Path::new("a.csv"),
        &LabelColumn::Name("status".into()),
    )
    .unwrap()
}

#[test]
fn a_schema_is_inferred_from_a_sites_file() {
    let s = schema();
    let kinds: Vec<(&str, &ColumnType)> = s
        .columns
        .iter()
        .map(|c| (c.name.as_str(), &c.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("age", &ColumnType::Numeric),
            (
                "stage",
                &ColumnType::Categorical {
                    categories: vec!["I".into(), "II".into(), "III".into()]
                }
            ),
            ("smoker", &ColumnType::Boolean),
            ("note", &ColumnType::Ignored),
        ]
    );
    assert_eq!(s.label, "status");
    assert_eq!(s.classes, ["0", "1"]);
    s.validate().unwrap();
    // It survives the job specification's TOML.
    let toml_text = toml::to_string(&s).unwrap();
    assert!(toml_text.contains("type = \"categorical\""), "{toml_text}");
    assert_eq!(toml::from_str::<Schema>(&toml_text).unwrap(), s);
}

#[test]
fn a_file_that_does_not_match_the_schema_is_refused_naming_column_and_line() {
    let s = schema();
    let p = Path::new("site.csv");
    for (text, want) in [
        (
            "age,stage,smoker,status\n1,I,yes,0\n",
            "column \"note\" of the job's schema is missing",
        ),
        (
            "age,stage,smoker,note,extra,status\n1,I,yes,,2,0\n",
            "column \"extra\" is not in the job's schema",
        ),
        (
            "age,stage,smoker,note,status\n1,I,yes,,0\nold,I,yes,,0\n",
            "site.csv:3: value \"old\" in numeric column \"age\"",
        ),
        (
            "age,stage,smoker,note,status\n1,I,maybe,,0\n",
            "site.csv:2: value \"maybe\" in boolean column \"smoker\"",
        ),
        (
            "age,stage,smoker,note,status\n1,I,yes,,2\n",
            "site.csv:2: label \"2\" in column \"status\" is not one of the job's classes",
        ),
    ] {
        let e = Table::parse(text, p, &s).unwrap_err().to_string();
        assert!(e.contains(want), "{text:?}: {e}");
    }
}

#[test]
fn the_federations_statistics_are_the_sum_of_its_sites_exactly() {
    let s = schema();
    let a = Table::parse(SITE_A, Path::new("a.csv"), &s).unwrap();
    let b = Table::parse(SITE_B, Path::new("b.csv"), &s).unwrap();
    let mut fed = TableStats::of(&a);
    fed.add(&TableStats::of(&b));
    assert_eq!(fed.rows, 6.0);
    let ColumnStats::Numeric(age) = fed.columns[0].clone() else {
        panic!()
    };
    // Present ages 50, 70, 60, 40; two missing. Site A's ages span 50 to 70, so the inferred
    // edges run from 50 to 70: 40 falls below them, 70 in the last bin.
    assert_eq!(
        (age.count, age.sum, age.sum_sq, age.missing),
        (4.0, 220.0, 2500.0 + 4900.0 + 3600.0 + 1600.0, 2.0)
    );
    assert_eq!(s.columns[0].bins.first(), Some(&50.0));
    assert_eq!(s.columns[0].bins.last(), Some(&70.0));
    assert_eq!(age.histogram.iter().sum::<f64>(), 4.0);
    assert_eq!(
        (age.histogram[0], *age.histogram.last().unwrap()),
        (1.0, 1.0)
    );
    assert_eq!(age.mean(), Some(55.0));
    assert!((age.std().unwrap() - 125f64.sqrt()).abs() < 1e-12);
    let ColumnStats::Categorical(stage) = &fed.columns[1] else {
        panic!()
    };
    // I, II, III, II, I, and IV (unknown).
    assert_eq!(stage.counts, [2.0, 2.0, 1.0]);
    assert_eq!((stage.unknown, stage.missing), (1.0, 0.0));
    let ColumnStats::Numeric(smoker) = fed.columns[2].clone() else {
        panic!()
    };
    assert_eq!((smoker.count, smoker.sum, smoker.missing), (5.0, 3.0, 1.0));
    assert_eq!(fed.labels, [3.0, 3.0]);
    // The summary table an operator sees: the federation's totals only.
    let summary = fed.summary(&s);
    let names: Vec<&str> = summary.iter().map(|c| c.column.as_str()).collect();
    assert_eq!(names, ["age", "stage", "smoker", "status"]);
    assert_eq!(summary[0].mean, Some(55.0));
    assert!((summary[0].missing_share - 2.0 / 6.0).abs() < 1e-12);
    assert_eq!(
        summary[1].shares,
        [
            ("I".to_string(), 2.0 / 6.0),
            ("II".to_string(), 2.0 / 6.0),
            ("III".to_string(), 1.0 / 6.0),
            ("(unknown)".to_string(), 1.0 / 6.0)
        ]
    );
    assert_eq!(summary[2].kind, "boolean");
    assert_eq!(
        summary[3].shares,
        [("0".to_string(), 0.5), ("1".to_string(), 0.5)]
    );
    // As one vector for secure aggregation, and back.
    let v = fed.to_values();
    assert_eq!(TableStats::from_values(&s, &v).unwrap(), fed);
    assert!(TableStats::from_values(&s, &v[1..]).is_err());
}

#[test]
fn the_pipeline_imputes_encodes_and_standardises_with_the_federations_statistics() {
    let s = schema();
    let a = Table::parse(SITE_A, Path::new("a.csv"), &s).unwrap();
    let b = Table::parse(SITE_B, Path::new("b.csv"), &s).unwrap();
    let mut fed = TableStats::of(&a);
    fed.add(&TableStats::of(&b));
    let p = Pipeline::fit(
        &s,
        &fed,
        PipelineOptions {
            impute: Impute::Mean,
            missing_indicators: true,
        },
    )
    .unwrap();
    assert_eq!(
        p.feature_names(),
        [
            "age",
            "age=missing",
            "stage=I",
            "stage=II",
            "stage=III",
            "stage=missing",
            "smoker",
            "smoker=missing"
        ]
    );
    let (ds, report) = p.transform(&b).unwrap();
    let sd = 125f64.sqrt();
    let row0: Vec<f32> = ds.row(0).to_vec();
    // 40 standardised; stage I; smoker "no" = 0 standardised by mean 0.6, std √0.24.
    let smoker_no = ((0.0 - 0.6) / 0.24f64.sqrt()) as f32;
    assert_eq!(
        row0,
        [
            ((40.0 - 55.0) / sd) as f32,
            0.0,
            1.0,
            0.0,
            0.0,
            0.0,
            smoker_no,
            0.0
        ]
    );
    // Missing age → the mean (0 after standardising) and its indicator; stage IV unknown:
    // all zeros, counted.
    let smoker_yes = ((1.0 - 0.6) / 0.24f64.sqrt()) as f32;
    assert_eq!(ds.row(1), [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, smoker_yes, 0.0]);
    let opts = PipelineOptions {
        impute: Impute::Mean,
        missing_indicators: true,
    };
    assert_eq!(Pipeline::width_for(&s, opts), p.width());
    assert_eq!(report.imputed, 1);
    assert_eq!(report.unknown_categories, 1);
    assert_eq!(ds.labels, [1, 0]);
    assert_eq!(ds.class_names, ["0", "1"]);
    // The same rows prepared anywhere give the same features (the pipeline travels as JSON).
    let again: Pipeline = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(again.transform(&b).unwrap().0.features, ds.features);
    // Strict mode refuses the missing age.
    let strict = Pipeline::fit(
        &s,
        &fed,
        PipelineOptions {
            impute: Impute::Refuse,
            missing_indicators: false,
        },
    )
    .unwrap();
    let e = strict.transform(&b).unwrap_err().to_string();
    assert!(e.contains("row 2: missing value in column \"age\""), "{e}");
}

#[test]
fn raw_records_read_like_the_file_and_prepare_to_the_same_features() {
    let s = schema();
    let b = Table::parse(SITE_B, Path::new("b.csv"), &s).unwrap();
    let mut fed = TableStats::of(&Table::parse(SITE_A, Path::new("a.csv"), &s).unwrap());
    fed.add(&TableStats::of(&b));
    let p = Pipeline::fit(&s, &fed, PipelineOptions::default()).unwrap();
    // SITE_B's rows as JSON objects would send them: a missing age left out, the unseen
    // stage IV, and the label on the first only.
    let rec = |pairs: &[(&str, &str)]| -> std::collections::BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let records = [
        rec(&[
            ("status", "1"),
            ("age", "40"),
            ("stage", "I"),
            ("smoker", "no"),
        ]),
        rec(&[("stage", "IV"), ("smoker", "yes"), ("note", "")]),
    ];
    let (ds, labels, report) = p.transform_records(&records).unwrap();
    assert_eq!(ds.features, p.transform(&b).unwrap().0.features);
    assert_eq!(labels, [Some(1), None]);
    assert_eq!((report.imputed, report.unknown_categories), (1, 1));
    let e = p
        .transform_records(&[rec(&[("age", "old")])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("request:1") && e.contains("\"age\""), "{e}");
    let e = p
        .transform_records(&[rec(&[("weight", "70")])])
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"weight\" is not in the model's schema"), "{e}");
}

#[test]
fn imputation_is_named_on_the_command_line() {
    assert_eq!("mean".parse::<Impute>(), Ok(Impute::Mean));
    assert_eq!("most-frequent".parse::<Impute>(), Ok(Impute::MostFrequent));
    assert_eq!(
        "constant:-1.5".parse::<Impute>(),
        Ok(Impute::Constant(-1.5))
    );
    assert_eq!("refuse".parse::<Impute>(), Ok(Impute::Refuse));
    let e = "constant:x".parse::<Impute>().unwrap_err();
    assert!(e.contains("constant:VALUE"), "{e}");
    // A constant fills numbers with itself (standardised like any value).
    let s = schema();
    let a = Table::parse(SITE_A, Path::new("a.csv"), &s).unwrap();
    let p = Pipeline::fit(
        &s,
        &TableStats::of(&a),
        PipelineOptions {
            impute: Impute::Constant(0.0),
            missing_indicators: false,
        },
    )
    .unwrap();
    let Step::Standardize { fill, .. } = &p.steps[0] else {
        panic!("{:?}", p.steps[0]);
    };
    assert_eq!(*fill, Some(0.0));
}

#[test]
fn quantiles_come_from_the_federations_histogram() {
    use super::summary::quantiles;
    // 100 values spread evenly over [0, 10): 10 a bin of width 1.
    let edges: Vec<f64> = (0..=10).map(f64::from).collect();
    let mut hist = vec![0.0; 12];
    hist[1..=10].fill(10.0);
    let q = quantiles(&edges, &hist);
    let want = [0.5, 2.5, 5.0, 7.5, 9.5];
    for ((_, v), w) in q.iter().zip(want) {
        assert!((v - w).abs() < 1e-12, "{q:?}");
    }
    // Mass in the tails is reported at the edges.
    let q = quantiles(
        &edges,
        &[50.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 50.0],
    );
    assert_eq!(q[0].1, 0.0);
    assert_eq!(q[4].1, 10.0);
    // A schema's bins must be increasing, and only on numeric columns.
    let mut s = schema();
    s.columns[0].bins = vec![1.0, 1.0];
    assert!(s.validate().unwrap_err().contains("\"age\": bins"));
}

#[test]
fn an_embedding_is_placed_by_the_schema_and_replaces_its_columns_one_hot_block() {
    use crate::layers::Layer;
    use crate::{ComputeDevice, ModelSpec};
    use burn::tensor::{Tensor, TensorData};
    let emb = |column: &str| Layer::Embedding {
        dim: 2,
        column: Some(column.into()),
        offset: 0,
        categories: 0,
    };
    let s = schema();
    for (indicators, offset, width) in [(false, 1, 5), (true, 2, 8)] {
        let spec = DataSpec {
            schema: s.clone(),
            options: PipelineOptions {
                impute: Impute::Mean,
                missing_indicators: indicators,
            },
        };
        assert_eq!(spec.width(), width);
        // Alone in the stack, it gives width − 3 + 2 values: a model of that many "classes".
        let mut layers = vec![emb("stage")];
        spec.resolve_embeddings(&mut layers).unwrap();
        let want = Layer::Embedding {
            dim: 2,
            column: Some("stage".into()),
            offset,
            categories: 3,
        };
        assert_eq!(layers, std::slice::from_ref(&want));
        spec.resolve_embeddings(&mut layers).unwrap();
        assert_eq!(layers, [want], "resolving twice changes nothing");
        let model = ModelSpec::Layers {
            inputs: width,
            channels: 0,
            height: 0,
            width: 0,
            classes: width - 1,
            layers,
        };
        model.validate().unwrap();
        assert_eq!(model.layout()[0].name, "layers.0.embedding.weight");
        assert_eq!(model.layout()[0].shape, [3, 2]);
        // Site B's rows through the federation's pipeline: stage I becomes the table's row 0,
        // the unknown stage IV zeros; every other feature keeps its value and order.
        let a = Table::parse(SITE_A, Path::new("a.csv"), &s).unwrap();
        let b = Table::parse(SITE_B, Path::new("b.csv"), &s).unwrap();
        let mut fed = TableStats::of(&a);
        fed.add(&TableStats::of(&b));
        let p = Pipeline::fit(&s, &fed, spec.options).unwrap();
        let (ds, _) = p.transform(&b).unwrap();
        let device = ComputeDevice::Cpu.inference();
        let net = model
            .build(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &device)
            .unwrap();
        let x = Tensor::<2>::from_data(TensorData::new(ds.features.clone(), [2, width]), &device);
        let out = net.forward(x).into_data().try_to_vec::<f32>().unwrap();
        for (r, embedded) in [(0, [1.0, 2.0]), (1, [0.0, 0.0])] {
            let row = ds.row(r);
            let mut want = row[..offset].to_vec();
            want.extend(embedded);
            want.extend(&row[offset + 3..]);
            assert_eq!(
                out[r * (width - 1)..(r + 1) * (width - 1)],
                want[..],
                "row {r}"
            );
        }
    }
    // What cannot be placed is named, with the layer.
    let spec = DataSpec {
        schema: s,
        options: PipelineOptions::default(),
    };
    let refused = |mut layers: Vec<Layer>| spec.resolve_embeddings(&mut layers).unwrap_err();
    assert_eq!(
        refused(vec![emb("age")]),
        "layer 0 (embedding): column \"age\" is numeric, not categorical"
    );
    assert_eq!(
        refused(vec![emb("smoker")]),
        "layer 0 (embedding): column \"smoker\" is boolean, not categorical"
    );
    assert_eq!(
        refused(vec![emb("note")]),
        "layer 0 (embedding): no used column \"note\" in the table schema (its categorical \
         columns: stage)"
    );
    assert_eq!(
        refused(vec![emb("stage"), emb("stage")]),
        "layer 1 (embedding): column \"stage\" is embedded by an earlier layer already"
    );
    assert!(
        refused(vec![Layer::Relu, emb("stage")]).starts_with(
            "layer 1 (embedding): column \"stage\": an embedding by column comes before"
        ),
    );
    // Without a schema, a layer by column is named as unplaced.
    let e = crate::layers::check(crate::FeatureShape::Flat(5), &[emb("stage")], 4).unwrap_err();
    assert!(
        e.starts_with("layer 0 (embedding): column \"stage\" was not found in a table schema"),
        "{e}"
    );
}
