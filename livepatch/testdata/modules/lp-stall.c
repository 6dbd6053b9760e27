// SPDX-License-Identifier: GPL-2.0
/*
 * lp-stall: a livepatch of stall-target's hot_stall_wait(). Its enable cannot finish while a
 * task sleeps in the old hot_stall_wait() (a reader of /proc/hot_stall), and its disable cannot
 * finish while a task sleeps in the replacement: hot must report such tasks, not hang.
 */
#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/module.h>
#include <linux/kernel.h>
#include <linux/livepatch.h>
#include <linux/wait.h>

extern wait_queue_head_t hot_stall_wq;
extern bool hot_stall_released;

static int hot_stall_wait_patched(void)
{
	/* Sleeps like the original, so that a disable can be held up too. */
	wait_event(hot_stall_wq, READ_ONCE(hot_stall_released));
	return 0;
}

static struct klp_func stall_funcs[] = {
	{ .old_name = "hot_stall_wait", .new_func = hot_stall_wait_patched },
	{}
};

static struct klp_object stall_objs[] = {
	{ .name = "stall_target", .funcs = stall_funcs },
	{}
};

static struct klp_patch stall_patch = {
	.mod = THIS_MODULE,
	.objs = stall_objs,
};

static int __init lp_stall_init(void)
{
	return klp_enable_patch(&stall_patch);
}

static void __exit lp_stall_exit(void)
{
}

module_init(lp_stall_init);
module_exit(lp_stall_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("hot test livepatch: stalls while a task sleeps in the patched function");
MODULE_INFO(livepatch, "Y");
