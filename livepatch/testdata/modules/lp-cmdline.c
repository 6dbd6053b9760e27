// SPDX-License-Identifier: GPL-2.0
/*
 * lp-cmdline: a livepatch that replaces cmdline_proc_show, so that reading /proc/cmdline
 * prints LP_TEXT instead of the boot command line. Disabling the patch brings the original
 * back. Used by hot's livepatch VM test.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/seq_file.h>

#ifndef LP_TEXT
#define LP_TEXT "hot-livepatch: cmdline patched"
#endif
#ifndef LP_REPLACE
#define LP_REPLACE false
#endif

static int hot_cmdline_proc_show(struct seq_file *m, void *v)
{
	seq_puts(m, LP_TEXT "\n");
	return 0;
}

static struct klp_func hot_funcs[] = {
	{ .old_name = "cmdline_proc_show", .new_func = hot_cmdline_proc_show },
	{}
};

static struct klp_object hot_objs[] = {
	{ .name = NULL /* vmlinux */, .funcs = hot_funcs },
	{}
};

static struct klp_patch hot_patch = {
	.mod = THIS_MODULE,
	.objs = hot_objs,
	.replace = LP_REPLACE,
};

static int __init hot_lp_init(void)
{
	return klp_enable_patch(&hot_patch);
}

static void __exit hot_lp_exit(void)
{
}

module_init(hot_lp_init);
module_exit(hot_lp_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("hot test livepatch: changes what /proc/cmdline prints");
MODULE_INFO(livepatch, "Y");
