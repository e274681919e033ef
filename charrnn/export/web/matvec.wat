;; The page's one hot loop, out[j] = W[j, :] . v for a row-major float32 W (rows, cols),
;; in WebAssembly SIMD (f32x4, two accumulators). cols must be a multiple of 8; the page
;; falls back to JavaScript otherwise. Pointers are byte offsets into the exported memory.
;; Built into the page's base64 by scripts/build_wasm.sh (wabt's wat2wasm).
(module
  (memory (export "memory") 1)
  (func (export "matvec") (param $out i32) (param $w i32) (param $rows i32) (param $cols i32) (param $v i32)
    (local $j i32) (local $k i32) (local $row i32) (local $bytes i32) (local $a v128) (local $b v128)
    (local.set $bytes (i32.shl (local.get $cols) (i32.const 2)))
    (local.set $row (local.get $w))
    (block $done
      (loop $rows_loop
        (br_if $done (i32.ge_u (local.get $j) (local.get $rows)))
        (local.set $a (v128.const f32x4 0 0 0 0))
        (local.set $b (v128.const f32x4 0 0 0 0))
        (local.set $k (i32.const 0))
        (block $row_done
          (loop $cols_loop
            (br_if $row_done (i32.ge_u (local.get $k) (local.get $bytes)))
            (local.set $a (f32x4.add (local.get $a)
              (f32x4.mul (v128.load (i32.add (local.get $row) (local.get $k)))
                         (v128.load (i32.add (local.get $v) (local.get $k))))))
            (local.set $b (f32x4.add (local.get $b)
              (f32x4.mul (v128.load (i32.add (local.get $row) (i32.add (local.get $k) (i32.const 16))))
                         (v128.load (i32.add (local.get $v) (i32.add (local.get $k) (i32.const 16)))))))
            (local.set $k (i32.add (local.get $k) (i32.const 32)))
            (br $cols_loop)))
        (local.set $a (f32x4.add (local.get $a) (local.get $b)))
        (f32.store (i32.add (local.get $out) (i32.shl (local.get $j) (i32.const 2)))
          (f32.add (f32.add (f32x4.extract_lane 0 (local.get $a)) (f32x4.extract_lane 1 (local.get $a)))
                   (f32.add (f32x4.extract_lane 2 (local.get $a)) (f32x4.extract_lane 3 (local.get $a)))))
        (local.set $row (i32.add (local.get $row) (local.get $bytes)))
        (local.set $j (i32.add (local.get $j) (i32.const 1)))
        (br $rows_loop)))))
