package ftrace

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf/btf"
)

// kernelFunc looks up a function in the kernel BTF and returns its prototype. The error
// explains that the target is unknown to this kernel.
func kernelFunc(spec *btf.Spec, name string) (*btf.FuncProto, error) {
	var fn *btf.Func
	if err := spec.TypeByName(name, &fn); err != nil {
		if errors.Is(err, btf.ErrNotFound) {
			return nil, fmt.Errorf("unknown target: the kernel BTF has no function %s", name)
		}
		return nil, fmt.Errorf("look up %s in the kernel BTF: %w", name, err)
	}
	proto, ok := fn.Type.(*btf.FuncProto)
	if !ok {
		return nil, fmt.Errorf("kernel BTF: %s has no prototype", name)
	}
	return proto, nil
}

// returnsInt reports whether the prototype returns a (signed) 32-bit int, the return type
// of LSM hooks that fmod_ret and BPF LSM programs may change.
func returnsInt(proto *btf.FuncProto) bool {
	i, ok := btf.UnderlyingType(proto.Return).(*btf.Int)
	return ok && i.Size == 4 && i.Encoding == btf.Signed
}

// describeReturn names a return type for error messages.
func describeReturn(proto *btf.FuncProto) string {
	if proto.Return == nil {
		return "void"
	}
	if _, ok := btf.UnderlyingType(proto.Return).(*btf.Void); ok {
		return "void"
	}
	return proto.Return.TypeName() + " (" + fmt.Sprintf("%T", btf.UnderlyingType(proto.Return)) + ")"
}

// paramIsStructPtr reports whether parameter idx of proto is a pointer to struct name.
func paramIsStructPtr(proto *btf.FuncProto, idx int, name string) bool {
	if idx >= len(proto.Params) {
		return false
	}
	ptr, ok := btf.UnderlyingType(proto.Params[idx].Type).(*btf.Pointer)
	if !ok {
		return false
	}
	s, ok := btf.UnderlyingType(ptr.Target).(*btf.Struct)
	return ok && s.Name == name
}

// checkSignature verifies that function name in spec returns int and takes exactly the
// given struct pointer parameters (struct names, in order).
func checkSignature(spec *btf.Spec, name string, structParams ...string) (*btf.FuncProto, error) {
	proto, err := kernelFunc(spec, name)
	if err != nil {
		return nil, err
	}
	if !returnsInt(proto) {
		return nil, fmt.Errorf("wrong signature: %s returns %s, want int", name, describeReturn(proto))
	}
	if structParams == nil {
		return proto, nil
	}
	if len(proto.Params) != len(structParams) {
		return nil, fmt.Errorf("wrong signature: %s takes %d parameters, want %d", name, len(proto.Params), len(structParams))
	}
	for i, s := range structParams {
		if !paramIsStructPtr(proto, i, s) {
			return nil, fmt.Errorf("wrong signature: parameter %d of %s is not a struct %s pointer", i+1, name, s)
		}
	}
	return proto, nil
}

// fieldOffset returns the byte offset and size of member field of struct name, checking
// that the member has the wanted size (0: any) and is not a bitfield.
func fieldOffset(spec *btf.Spec, structName, field string, wantSize int) (uint32, error) {
	var s *btf.Struct
	if err := spec.TypeByName(structName, &s); err != nil {
		return 0, fmt.Errorf("kernel BTF: struct %s: %w", structName, err)
	}
	for _, m := range s.Members {
		if m.Name != field {
			continue
		}
		if m.BitfieldSize != 0 || m.Offset%8 != 0 {
			return 0, fmt.Errorf("kernel BTF: %s.%s is a bitfield", structName, field)
		}
		size, err := btf.Sizeof(m.Type)
		if err != nil {
			return 0, fmt.Errorf("kernel BTF: size of %s.%s: %w", structName, field, err)
		}
		if wantSize != 0 && size != wantSize {
			return 0, fmt.Errorf("kernel BTF: %s.%s is %d bytes, want %d", structName, field, size, wantSize)
		}
		return m.Offset.Bytes(), nil
	}
	return 0, fmt.Errorf("kernel BTF: struct %s has no member %s", structName, field)
}
