//! Dataset tests: CSV and IDX parsing (good files and every kind of bad one), the built-in
//! digits, seeded stratified splits, and the standardiser.

use lathe_model::data::{
    DataError, Dataset, Standardizer, builtin, builtin_names, parse_csv, parse_idx, split,
};

/// Parses `input` with label column `label` and checks the error message contains
/// `expected`.
fn check_csv_error(input: &str, label: &str, expected: &str) {
    match parse_csv(input.as_bytes(), label) {
        Ok(data) => panic!(
            "{input:?} parsed ({} rows) but should fail with {expected:?}",
            data.rows()
        ),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(expected),
                "{input:?}: error {message:?} does not contain {expected:?}"
            );
            assert!(!message.ends_with('.'), "{message:?} ends with a period");
        }
    }
}

#[test]
fn bad_csv_files_are_rejected_with_the_row_column_and_reason() {
    let cases = [
        ("", "label", "the CSV file is empty"),
        ("label,a\n", "label", "no data rows"),
        (
            "label\nx\ny\n",
            "label",
            "no feature columns besides the label column \"label\"",
        ),
        (
            "y,a,b\n1,2,3\n",
            "label",
            "label column \"label\" not found; the columns are [\"y\", \"a\", \"b\"]",
        ),
        ("label,a,label\n1,2,3\n", "label", "appears 2 times"),
        (
            "a,label\n1,x\nfoo,y\n",
            "label",
            "data row 2, column \"a\": \"foo\" is not a number",
        ),
        (
            "a,b,label\n1,2,x\n1,x\n",
            "label",
            "data row 2: expected 3 fields (as in the header), found 2",
        ),
        (
            "a,b,label\n1,2,x\n1,2,3,4\n",
            "label",
            "data row 2: expected 3 fields (as in the header), found 4",
        ),
        (
            "a,label\nNaN,x\n",
            "label",
            "data row 1, column \"a\": \"NaN\" is not a finite number",
        ),
        (
            "a,b,label\n1,inf,x\n",
            "label",
            "data row 1, column \"b\": \"inf\" is not a finite number",
        ),
        (
            "a,b,label\n1,-inf,x\n",
            "label",
            "column \"b\": \"-inf\" is not a finite number",
        ),
        (
            "a,label\n1,x\n2,\n",
            "label",
            "data row 2, column \"label\": the label is empty",
        ),
        (
            "a,label\n1,x\n,y\n",
            "label",
            "data row 2, column \"a\": \"\" is not a number",
        ),
        (
            "a,label\n1,x\n\"2,y\n",
            "label",
            "data row 2: expected 2 fields",
        ),
    ];
    for (input, label, expected) in cases {
        check_csv_error(input, label, expected);
    }
}

#[test]
fn invalid_utf8_is_reported_with_its_row() {
    let mut bytes = b"a,label\n1,x\n".to_vec();
    bytes.extend_from_slice(b"2,\xff\xfe\n");
    let message = parse_csv(&bytes, "label").unwrap_err().to_string();
    assert!(message.starts_with("data row 2:"), "{message}");
}

#[test]
fn the_label_column_may_be_anywhere_and_have_any_name() {
    let data = parse_csv(
        b"f1, species ,f2\n1.5,setosa,2\n-3,virginica,4e1\n0,setosa,0.25\n",
        "species",
    )
    .expect("valid CSV");
    assert_eq!(data.rows(), 3);
    assert_eq!(data.n_features, 2);
    assert_eq!(data.feature_names, ["f1", "f2"]);
    assert_eq!(data.class_labels, ["setosa", "virginica"]);
    assert_eq!(data.labels, [0, 1, 0]);
    assert_eq!(data.row(1), [-3.0, 40.0]);
    assert_eq!(data.features, [1.5, 2.0, -3.0, 40.0, 0.0, 0.25]);
    assert_eq!(data.n_classes(), 2);
}

#[test]
fn integer_labels_sort_numerically_and_text_labels_lexicographically() {
    let data = parse_csv(b"x,class\n1,10\n2,9\n3,-1\n4,9\n", "class").expect("valid CSV");
    assert_eq!(data.class_labels, ["-1", "9", "10"]);
    assert_eq!(data.labels, [2, 1, 0, 1]);
    let data = parse_csv(b"x,class\n1,b\n2,10\n3,a\n", "class").expect("valid CSV");
    assert_eq!(data.class_labels, ["10", "a", "b"]);
    assert_eq!(data.labels, [2, 0, 1]);
}

#[test]
fn builtin_digits_is_the_peer_split() {
    let (train, test) = builtin("digits").expect("digits is built in");
    assert_eq!((train.rows(), test.rows()), (1437, 360));
    assert_eq!((train.n_features, test.n_features), (64, 64));
    let labels: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    assert_eq!(train.class_labels, labels);
    assert_eq!(test.class_labels, labels);
    assert_eq!(train.feature_names[0], "p0");
    assert_eq!(train.feature_names[63], "p63");
    // Class counts as recorded by the peer in bench/results.json.
    assert_eq!(
        test.class_counts(),
        [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    );
    assert_eq!(train.class_counts().iter().sum::<usize>(), 1437);
    assert!(
        train
            .features
            .iter()
            .all(|&p| (0.0..=16.0).contains(&p) && p.fract() == 0.0)
    );
    // The first training row of the file: label 3, pixels 0,0,8,16,16,12,0,0.
    assert_eq!(train.class_labels[train.labels[0] as usize], "3");
    assert_eq!(
        &train.row(0)[..8],
        [0.0, 0.0, 8.0, 16.0, 16.0, 12.0, 0.0, 0.0]
    );
}

#[test]
fn an_unknown_builtin_lists_the_builtins() {
    let message = builtin("mnist").unwrap_err().to_string();
    assert_eq!(
        message,
        "unknown built-in dataset \"mnist\": the built-ins are digits"
    );
    assert_eq!(builtin_names(), ["digits"]);
}

/// A valid IDX pair of `n` images of `rows × columns` pixels with the given labels.
fn idx_files(rows: u32, columns: u32, images: &[Vec<u8>], labels: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut image_file = 0x0000_0803u32.to_be_bytes().to_vec();
    image_file.extend((images.len() as u32).to_be_bytes());
    image_file.extend(rows.to_be_bytes());
    image_file.extend(columns.to_be_bytes());
    for image in images {
        image_file.extend(image);
    }
    let mut label_file = 0x0000_0801u32.to_be_bytes().to_vec();
    label_file.extend((labels.len() as u32).to_be_bytes());
    label_file.extend(labels);
    (image_file, label_file)
}

#[test]
fn idx_files_parse_to_pixels_and_present_labels() {
    let images = vec![vec![0, 255, 3, 4], vec![9, 8, 7, 6], vec![1, 1, 1, 1]];
    let (image_file, label_file) = idx_files(2, 2, &images, &[7, 2, 7]);
    let data = parse_idx(&image_file, &label_file).expect("valid IDX");
    assert_eq!(data.rows(), 3);
    assert_eq!(data.n_features, 4);
    assert_eq!(data.row(0), [0.0, 255.0, 3.0, 4.0]);
    assert_eq!(data.row(2), [1.0, 1.0, 1.0, 1.0]);
    assert_eq!(data.class_labels, ["2", "7"]);
    assert_eq!(data.labels, [1, 0, 1]);
    assert_eq!(data.feature_names, ["p0", "p1", "p2", "p3"]);
}

#[test]
fn bad_idx_files_are_rejected_with_the_reason() {
    let images = vec![vec![1, 2, 3, 4], vec![5, 6, 7, 8]];
    let (image_file, label_file) = idx_files(2, 2, &images, &[0, 1]);
    let mut wrong_image_magic = image_file.clone();
    wrong_image_magic[3] = 0x01;
    let mut wrong_label_magic = label_file.clone();
    wrong_label_magic[3] = 0x03;
    let (_, three_labels) = idx_files(2, 2, &images, &[0, 1, 1]);
    let mut trailing = image_file.clone();
    trailing.push(0);
    let (zero_pixels, zero_labels) = idx_files(0, 5, &[], &[]);
    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (
            wrong_image_magic,
            label_file.clone(),
            "IDX images file: magic number is 0x00000801, expected 0x00000803",
        ),
        (
            image_file.clone(),
            wrong_label_magic,
            "IDX labels file: magic number is 0x00000803, expected 0x00000801",
        ),
        (
            image_file[..image_file.len() - 1].to_vec(),
            label_file.clone(),
            "IDX images file is truncated: 24 bytes needed, 23 present",
        ),
        (
            image_file.clone(),
            label_file[..9].to_vec(),
            "IDX labels file is truncated: 10 bytes needed, 9 present",
        ),
        (
            image_file[..6].to_vec(),
            label_file.clone(),
            "IDX images file is truncated: 8 bytes needed",
        ),
        (
            Vec::new(),
            label_file.clone(),
            "IDX images file is truncated: 4 bytes needed, 0 present",
        ),
        (
            image_file.clone(),
            three_labels,
            "IDX files disagree: 2 images but 3 labels",
        ),
        (
            trailing,
            label_file.clone(),
            "IDX images file has 1 unexpected bytes after the data",
        ),
        (
            zero_pixels,
            zero_labels,
            "declares 0x5 images, which have no pixels",
        ),
    ];
    for (images, labels, expected) in cases {
        let message = parse_idx(&images, &labels).unwrap_err().to_string();
        assert!(
            message.contains(expected),
            "{message:?} does not contain {expected:?}"
        );
    }
}

/// Rows of `data` as (features, label string) pairs, to compare data sets by content.
fn rows_of(data: &Dataset) -> Vec<(Vec<u32>, String)> {
    (0..data.rows())
        .map(|i| {
            (
                data.row(i).iter().map(|v| v.to_bits()).collect(),
                data.class_labels[data.labels[i] as usize].clone(),
            )
        })
        .collect()
}

#[test]
fn splits_are_deterministic_by_seed_and_stratified() {
    let (train, _) = builtin("digits").expect("digits");
    let a = split(train.clone(), None, 0.1, 0.2, 7).expect("split");
    let b = split(train.clone(), None, 0.1, 0.2, 7).expect("split");
    let c = split(train.clone(), None, 0.1, 0.2, 8).expect("split");
    assert_eq!(a, b, "same seed, same split");
    assert_ne!(a.validation, c.validation, "another seed, another split");
    assert_eq!(
        a.train.rows() + a.validation.rows() + a.test.rows(),
        train.rows()
    );

    // Every row lands in exactly one part.
    let mut all: Vec<_> = [&a.train, &a.validation, &a.test]
        .iter()
        .flat_map(|d| rows_of(d))
        .collect();
    let mut original = rows_of(&train);
    all.sort();
    original.sort();
    assert_eq!(all, original);

    // Stratified: each class contributes round(count × fraction) rows to each part.
    let counts = train.class_counts();
    for (class, &count) in counts.iter().enumerate() {
        let test_count = (count as f64 * 0.2).round() as usize;
        let validation_count = (count as f64 * 0.1).round() as usize;
        assert_eq!(a.test.class_counts()[class], test_count, "class {class}");
        assert_eq!(
            a.validation.class_counts()[class],
            validation_count,
            "class {class}"
        );
    }
    for part in [&a.train, &a.validation, &a.test] {
        assert_eq!(part.class_labels, train.class_labels);
        assert_eq!(part.feature_names, train.feature_names);
    }
}

#[test]
fn a_given_test_set_is_used_as_is_and_relabelled_onto_the_training_classes() {
    let train = parse_csv(
        b"a,label\n1,cat\n2,dog\n3,cat\n4,dog\n5,eel\n6,eel\n",
        "label",
    )
    .expect("csv");
    // The test file has only two of the classes, so its own indices differ from train's.
    let test = parse_csv(b"a,label\n7,eel\n8,dog\n", "label").expect("csv");
    assert_eq!(test.class_labels, ["dog", "eel"]);
    let splits = split(train.clone(), Some(test), 0.0, 0.5, 1).expect("split");
    assert_eq!(splits.test.class_labels, ["cat", "dog", "eel"]);
    assert_eq!(splits.test.labels, [2, 1]);
    assert_eq!(splits.test.features, [7.0, 8.0]);
    assert_eq!(
        splits.train, train,
        "test_fraction is not used when a test set is given"
    );

    let unknown = parse_csv(b"a,label\n7,fox\n", "label").expect("csv");
    let message = split(train.clone(), Some(unknown), 0.0, 0.0, 1)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "test set class label \"fox\" does not occur in the training data (classes: [\"cat\", \"dog\", \"eel\"])"
    );
    let wide = parse_csv(b"a,b,label\n7,8,cat\n", "label").expect("csv");
    let message = split(train.clone(), Some(wide), 0.0, 0.0, 1)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "test set has 2 features but the training data has 1"
    );
    let renamed = parse_csv(b"z,label\n7,cat\n", "label").expect("csv");
    let message = split(train, Some(renamed), 0.0, 0.0, 1)
        .unwrap_err()
        .to_string();
    assert_eq!(
        message,
        "test set feature 0 is named \"z\" but the training data's is \"a\""
    );
}

#[test]
fn split_fractions_are_checked() {
    let (train, _) = builtin("digits").expect("digits");
    let cases = [
        (
            -0.1,
            0.2,
            "validation_fraction must be a finite number in [0, 1), got -0.1",
        ),
        (
            f32::NAN,
            0.2,
            "validation_fraction must be a finite number in [0, 1), got NaN",
        ),
        (
            0.1,
            1.0,
            "test_fraction must be a finite number in [0, 1), got 1",
        ),
        (
            0.5,
            0.5,
            "validation_fraction (0.5) + test_fraction (0.5) must be below 1",
        ),
    ];
    for (validation, test, expected) in cases {
        let message = split(train.clone(), None, validation, test, 0)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(expected),
            "{message:?} does not contain {expected:?}"
        );
    }
    assert!(matches!(
        split(train, None, 0.5, 0.5, 0),
        Err(DataError::FractionsTooLarge { .. })
    ));
}

#[test]
fn every_class_keeps_a_training_row() {
    let data = parse_csv(b"a,label\n1,x\n2,y\n3,y\n", "label").expect("csv");
    let splits = split(data, None, 0.5, 0.45, 3).expect("split");
    assert_eq!(splits.train.class_counts(), [1, 1]);
}

#[test]
fn the_standardizer_is_fitted_on_the_training_split_only() {
    let (train_file, test_file) = builtin("digits").expect("digits");
    let splits = split(train_file.clone(), Some(test_file.clone()), 0.1, 0.0, 0).expect("split");
    let fitted = Standardizer::fit(&splits.train);

    // Standardised training columns have mean 0 and (population) std 1, or are constant.
    let standardised = fitted.transform(&splits.train);
    let n = splits.train.rows() as f64;
    for column in 0..64 {
        let values: Vec<f64> = standardised
            .iter()
            .skip(column)
            .step_by(64)
            .map(|&v| f64::from(v))
            .collect();
        let mean = values.iter().sum::<f64>() / n;
        let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 1e-5, "column {column} mean {mean}");
        assert!(
            variance == 0.0 || (variance - 1.0).abs() < 1e-4,
            "column {column} variance {variance}"
        );
    }
    // The validation and test rows do not influence it.
    let mut everything = splits.train.clone();
    everything.features.extend_from_slice(&test_file.features);
    everything.labels.extend_from_slice(&test_file.labels);
    assert_ne!(Standardizer::fit(&everything), fitted);

    // On the peer's train file the constant columns are p0, p24, p32 and p39, with scale 1.
    let peer = Standardizer::fit(&train_file);
    let constant: Vec<&str> = peer
        .scale
        .iter()
        .zip(&train_file.feature_names)
        .filter(|(s, _)| **s == 1.0)
        .map(|(_, name)| name.as_str())
        .collect();
    assert_eq!(constant, ["p0", "p24", "p32", "p39"]);
    let mut row = train_file.row(0).to_vec();
    peer.apply(&mut row);
    for (i, v) in row.iter().enumerate() {
        let expected = (train_file.row(0)[i] - peer.mean[i]) / peer.scale[i];
        assert_eq!(*v, expected);
    }
    let json = serde_json::to_string(&peer).expect("serializes");
    assert_eq!(
        serde_json::from_str::<Standardizer>(&json).expect("deserializes"),
        peer
    );
}

#[test]
fn the_embedded_digits_files_are_the_recorded_ones() {
    // The SHA-256 values in data/README.md (and the peer's results.json).
    use sha2::{Digest, Sha256};
    let train = include_bytes!("../../../data/digits_train.csv");
    let test = include_bytes!("../../../data/digits_test.csv");
    assert_eq!(
        hex::encode(Sha256::digest(train)),
        "0f8f71ce6ca74e344ba5cfa1da2e59c6bcd24b45cd4e04436020df1bfe86bd64"
    );
    assert_eq!(
        hex::encode(Sha256::digest(test)),
        "5a3525ed6d638888f525763ad9a06ddb438ff611a9352d396cdf0b6f1a944037"
    );
}
